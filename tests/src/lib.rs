//! Harness for the end-to-end tests in `tests/tests/`: real processes, guests and namespaces.
