#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    authrealm_sidecar::cli::main()
}
