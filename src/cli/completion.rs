//! `keycard completion bash|zsh|fish`: a completion script made from the same clap definitions
//! that parse the command line, so it never falls behind a new flag.
//!
//! ```sh
//! source <(keycard completion bash)                        # bash, this shell
//! keycard completion zsh > "${fpath[1]}/_keycard"          # zsh
//! keycard completion fish > ~/.config/fish/completions/keycard.fish
//! ```

use std::process::ExitCode;

use clap::{Args, CommandFactory as _, ValueEnum};
use clap_complete::Shell;

#[derive(Debug, Args)]
pub struct CompletionArgs {
    shell: CompletionShell,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

pub fn run(a: CompletionArgs) -> anyhow::Result<ExitCode> {
    let shell = match a.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
    };
    let mut cmd = super::Cli::command();
    clap_complete::generate(shell, &mut cmd, "keycard", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
