//! The `jobmeter` binary: parses the command line and runs it.

// The meter's threads (pipeline, committer, librdkafka's) allocate and free
// each other's buffers all the time; glibc's malloc serialised them on its
// arena locks. mimalloc frees across threads without that contention.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match jobmeter::cli::main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes, each said once (library errors
            // already name their cause in their own message).
            let mut msg = String::new();
            for cause in e.chain() {
                let text = cause.to_string();
                if msg.is_empty() {
                    msg = text;
                } else if !msg.contains(&text) {
                    msg.push_str(": ");
                    msg.push_str(&text);
                }
            }
            eprintln!("error: {msg}");
            std::process::ExitCode::from(2)
        }
    }
}
