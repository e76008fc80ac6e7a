#![forbid(unsafe_code)]

use clap::Parser;

use authrealm_operator::cli::{self, Args, Command, EXIT_USAGE};

fn main() {
    let args = Args::parse();
    if let Some(Command::Crdgen) = args.command {
        print!("{}", authrealm_operator::crd::crd_yaml());
        return;
    }
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    cli::init_logging(args.log_format);
    let cfg = match args.run.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authrealm-operator: {e}");
            std::process::exit(EXIT_USAGE);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let code = runtime.block_on(cli::run(cfg));
    std::process::exit(code);
}
