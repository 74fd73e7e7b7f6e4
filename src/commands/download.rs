//! `imgshift download aws`: an EBS snapshot back into a local image of any format (sparse, atomic).

use anyhow::{Context, Result, bail};
use imgshift_converters::{ConvertOptions, convert, create_writer};

use super::upload::{aws_target, policy, runtime};
use crate::cli::AwsDownloadArgs;
use crate::progress::Bar;
use crate::targets::aws::config;
use crate::targets::aws::download::EbsSnapshotSource;

/// Runs `download aws`.
pub fn aws(args: &AwsDownloadArgs, quiet: bool) -> Result<u8> {
    if args.threads == 0 || args.threads > 256 {
        bail!("-m must be between 1 and 256");
    }
    let fmt = super::convert::output_format(&args.output_format)?;
    if super::convert::wants_help(&args.options) {
        outln!("{}", super::convert::options_help(fmt).trim_end());
        return Ok(0);
    }
    let mut opts = super::convert::writer_opts(fmt, &args.options, false)?;
    let mut writer = create_writer(fmt, &mut opts)?;
    let rt = runtime()?;
    let sdk = rt.block_on(config::load(&aws_target(&args.conn)));
    if sdk.region().is_none() {
        bail!("no AWS region: pass --region or set AWS_REGION");
    }
    let client = aws_sdk_ebs::Client::new(&sdk);
    let src = EbsSnapshotSource::open(
        rt.handle().clone(),
        client,
        policy(&args.conn),
        &args.snapshot_id,
    )
    .with_context(|| format!("cannot list snapshot {}", args.snapshot_id))?;
    let (set, mut sink) = crate::interrupt::output_set(&args.dst, args.cache.durability())?;
    let bar = Bar::new("download", args.progress, quiet);
    let copts = ConvertOptions {
        threads: args.threads,
        in_flight: args.threads * 2,
        ..ConvertOptions::default()
    };
    convert(&src, writer.as_mut(), &mut sink, &copts, &bar).with_context(|| {
        format!(
            "cannot download {} to {}",
            args.snapshot_id,
            args.dst.display()
        )
    })?;
    bar.finish();
    drop(sink);
    set.commit()?;
    drop(rt);
    Ok(0)
}
