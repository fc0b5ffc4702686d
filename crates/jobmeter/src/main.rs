//! The `jobmeter` binary: parses the command line and runs it.

// The meter's threads (pipeline, committer, librdkafka's) allocate and free
// each other's buffers all the time; glibc's malloc serialised them on its
// arena locks. mimalloc frees across threads without that contention.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match jobmeter::cli::main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", jobmeter_offline::cli::error_text(&e));
            std::process::ExitCode::from(2)
        }
    }
}
