use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = openshell::cli::Cli::parse();
    match openshell::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
