//! colo-compare: one comparison engine driven live over sockets or offline over pcap files.

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("replay") {
        eprintln!("comparer replay: not built yet; see the open issues");
        return std::process::ExitCode::from(2);
    }
    // Live mode (comparer::live): QEMU-style options, see `comparer --help`.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match comparer::live::run_cli(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(comparer::live::LiveError::Help(msg)) => {
            print!("{msg}");
            std::process::ExitCode::SUCCESS
        }
        Err(comparer::live::LiveError::Usage(msg)) => {
            eprint!("{msg}");
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("comparer: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
