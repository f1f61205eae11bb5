//! `keycard`: zero-trust service-to-service security in one binary. This file only parses the
//! command line and reports errors; the work is in the crates.

#![forbid(unsafe_code)]

mod bookinfo;
mod cli;

use std::process::ExitCode;

use clap::Parser as _;

#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let log_control = cli::init_logging(&args.log);
    match cli::run(args, log_control) {
        Ok(code) => code,
        Err(e) => {
            // One line on stderr: the error and its causes, joined by ": ".
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("keycard: {msg}");
            ExitCode::FAILURE
        }
    }
}
