//! The `jobmeter` binary: parses the command line and runs it.

fn main() -> std::process::ExitCode {
    match jobmeter::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
