use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    loadgen::app::main(loadgen::cli::Cli::parse())
}
