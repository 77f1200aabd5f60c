//! The `plugvisor` binary: daemon and CLI. See [`plugvisor_cli::cli`].

use clap::Parser;

fn main() {
    let cli = plugvisor_cli::cli::Cli::parse();
    std::process::exit(plugvisor_cli::cli::main(cli));
}
