//! The `offsite` binary: install the signal handlers, run [`offsite::cli::main`], exit with its
//! code. Everything else lives in the library (src/lib.rs).

use std::process::ExitCode;

fn main() -> ExitCode {
    offsite::signals::install();
    let code = offsite::cli::main();
    ExitCode::from(u8::try_from(code.as_i32()).unwrap_or(1))
}
