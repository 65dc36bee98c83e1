//! What the three binaries' command lines share: the check that every flag says what it
//! is in `--help` (each binary's tests run it on its own `clap` command).

/// Every argument of `cmd` and its subcommands that has no help text, as
/// `PATH ARGUMENT` (`berth submit cpus`); `name` is the binary's name.
pub fn arguments_without_help(cmd: &clap::Command, name: &str) -> Vec<String> {
    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for a in cmd.get_arguments().filter(|a| a.get_help().is_none()) {
            missing.push(format!("{path} {}", a.get_id()));
        }
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), missing);
        }
    }
    let mut missing = Vec::new();
    walk(cmd, name, &mut missing);
    missing
}
