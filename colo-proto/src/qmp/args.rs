//! Argument helpers for command handlers, with QEMU's error messages.
//!
//! ```
//! use colo_proto::qmp::{args, QmpError};
//! use serde_json::{json, Map, Value};
//!
//! fn handler(a: &Map<String, Value>) -> Result<Value, QmpError> {
//!     args::reject_unknown(a, &["id", "enable"])?;
//!     let id = args::required_str(a, "id")?;
//!     let enable = args::optional_bool(a, "enable")?.unwrap_or(true);
//!     Ok(json!({ "id": id, "enable": enable }))
//! }
//! let err = handler(&Map::new()).unwrap_err();
//! assert_eq!(err.desc, "Parameter 'id' is missing");
//! ```

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::QmpError;

/// `Parameter 'NAME' is missing`.
pub fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

/// `Invalid parameter type for 'NAME', expected: TYPE`.
pub fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// `Parameter 'NAME' expects WHAT` (a value of the right type but out of range/not allowed).
pub fn invalid_value(name: &str, expects: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' expects {expects}"))
}

/// `Parameter 'NAME' is unexpected`.
pub fn unexpected(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is unexpected"))
}

/// Refuses any argument not in `allowed` (QEMU refuses unknown members).
pub fn reject_unknown(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(unexpected(k)),
        None => Ok(()),
    }
}

/// The raw value of a required argument.
pub fn required<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a Value, QmpError> {
    args.get(name).ok_or_else(|| missing(name))
}

/// A required string.
pub fn required_str<'a>(args: &'a Map<String, Value>, name: &str) -> Result<&'a str, QmpError> {
    optional_str(args, name)?.ok_or_else(|| missing(name))
}

/// An optional string.
pub fn optional_str<'a>(
    args: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(invalid_type(name, "string")),
    }
}

/// A required boolean.
pub fn required_bool(args: &Map<String, Value>, name: &str) -> Result<bool, QmpError> {
    optional_bool(args, name)?.ok_or_else(|| missing(name))
}

/// An optional boolean.
pub fn optional_bool(args: &Map<String, Value>, name: &str) -> Result<Option<bool>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid_type(name, "boolean")),
    }
}

/// A required unsigned integer.
pub fn required_u64(args: &Map<String, Value>, name: &str) -> Result<u64, QmpError> {
    optional_u64(args, name)?.ok_or_else(|| missing(name))
}

/// An optional unsigned integer (negative numbers: `Parameter 'x' expects uint64`).
pub fn optional_u64(args: &Map<String, Value>, name: &str) -> Result<Option<u64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None if n.is_f64() => Err(invalid_type(name, "integer")),
            None => Err(invalid_value(name, "uint64")),
        },
        Some(_) => Err(invalid_type(name, "integer")),
    }
}

/// A required signed integer.
pub fn required_i64(args: &Map<String, Value>, name: &str) -> Result<i64, QmpError> {
    optional_i64(args, name)?.ok_or_else(|| missing(name))
}

/// An optional signed integer.
pub fn optional_i64(args: &Map<String, Value>, name: &str) -> Result<Option<i64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(v) => Ok(Some(v)),
            None if n.is_f64() => Err(invalid_type(name, "integer")),
            None => Err(invalid_value(name, "int64")),
        },
        Some(_) => Err(invalid_type(name, "integer")),
    }
}

/// An optional number (integers accepted).
pub fn optional_f64(args: &Map<String, Value>, name: &str) -> Result<Option<f64>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_f64()
            .map(Some)
            .ok_or_else(|| invalid_type(name, "number")),
        Some(_) => Err(invalid_type(name, "number")),
    }
}

/// An optional object.
pub fn optional_object<'a>(
    args: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Map<String, Value>>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(invalid_type(name, "object")),
    }
}

/// A required object.
pub fn required_object<'a>(
    args: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a Map<String, Value>, QmpError> {
    optional_object(args, name)?.ok_or_else(|| missing(name))
}

/// An optional array.
pub fn optional_array<'a>(
    args: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a Vec<Value>>, QmpError> {
    match args.get(name) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(invalid_type(name, "array")),
    }
}

/// A required array.
pub fn required_array<'a>(
    args: &'a Map<String, Value>,
    name: &str,
) -> Result<&'a Vec<Value>, QmpError> {
    optional_array(args, name)?.ok_or_else(|| missing(name))
}

/// All arguments as a typed struct through serde (`#[serde(deny_unknown_fields)]` recommended);
/// serde's message becomes the `GenericError` description.
pub fn parse<T: DeserializeOwned>(args: &Map<String, Value>) -> Result<T, QmpError> {
    T::deserialize(Value::Object(args.clone()))
        .map_err(|e| QmpError::generic(format!("Invalid arguments: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => panic!("not an object"),
        }
    }

    #[test]
    fn messages_match_qemu() {
        let a = obj(json!({"s": 1, "b": "x", "n": -1, "f": 1.5}));
        assert_eq!(
            required_str(&a, "id").unwrap_err().desc,
            "Parameter 'id' is missing"
        );
        assert_eq!(
            required_str(&a, "s").unwrap_err().desc,
            "Invalid parameter type for 's', expected: string"
        );
        assert_eq!(
            optional_bool(&a, "b").unwrap_err().desc,
            "Invalid parameter type for 'b', expected: boolean"
        );
        assert_eq!(
            optional_u64(&a, "n").unwrap_err().desc,
            "Parameter 'n' expects uint64"
        );
        assert_eq!(
            optional_u64(&a, "f").unwrap_err().desc,
            "Invalid parameter type for 'f', expected: integer"
        );
        assert_eq!(optional_i64(&a, "n").unwrap(), Some(-1));
        assert_eq!(
            reject_unknown(&a, &["s", "b", "n"]).unwrap_err().desc,
            "Parameter 'f' is unexpected"
        );
        assert_eq!(
            required_u64(&a, "b").unwrap_err().class,
            super::super::ErrorClass::GenericError
        );
    }

    #[test]
    fn values_come_through() {
        let a = obj(json!({"s": "x", "b": true, "u": 7, "o": {"k": 1}, "l": [1]}));
        assert_eq!(required_str(&a, "s").unwrap(), "x");
        assert!(required_bool(&a, "b").unwrap());
        assert_eq!(required_u64(&a, "u").unwrap(), 7);
        assert_eq!(optional_u64(&a, "none").unwrap(), None);
        assert_eq!(required_object(&a, "o").unwrap().len(), 1);
        assert_eq!(required_array(&a, "l").unwrap().len(), 1);
        assert_eq!(optional_f64(&a, "u").unwrap(), Some(7.0));

        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct T {
            s: String,
        }
        let t: T = parse(&obj(json!({"s": "v"}))).unwrap();
        assert_eq!(t.s, "v");
        assert!(parse::<T>(&a).is_err());
    }
}
