//! Runs the load generator on its own, for development before (and besides)
//! the `csms loadgen` subcommand: `loadgen-dev --stations 100 --mode saturation`.

use clap::Parser;

#[derive(Parser)]
#[command(name = "loadgen-dev")]
struct Cli {
    #[command(flatten)]
    args: loadgen::LoadgenArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(loadgen::run(cli.args))?;
    print!("{report}");
    Ok(())
}
