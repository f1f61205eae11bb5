//! `keycard-bench`: the side-by-side benchmark. `keycard-bench run` starts every system fresh, puts
//! the same load through each (interleaved, repeated), reads each proxy's CPU and memory from
//! `/proc`, and writes `RESULTS.md`, `results.json` and `latency.svg`. See `bench/README.md`.

mod backend;
mod load;
mod measure;
mod procfs;
mod report;
mod systems;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "keycard-bench",
    version,
    about = "Latency, CPU and memory of keycard's sidecar pair against peers"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the benchmark and write the results.
    Run(measure::Settings),
    /// The HTTP/1.1 backend (started by `run` as its own process).
    Backend {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Rewrite RESULTS.md and latency.svg from a results.json (after editing the report code).
    Report {
        #[arg(long, default_value = "bench/results.json")]
        json: PathBuf,
        #[arg(long, default_value = "bench")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(settings) => measure::run(settings),
        Cmd::Backend { listen } => backend::run(listen),
        Cmd::Report { json, out } => report::rewrite(&json, &out),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keycard-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
