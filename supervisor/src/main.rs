//! The `plugvisor` binary: daemon and CLI. See [`plugvisor::cli`].

use clap::Parser;

fn main() {
    let cli = plugvisor::cli::Cli::parse();
    std::process::exit(plugvisor::cli::main(cli));
}
