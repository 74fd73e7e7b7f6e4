//! `imgshift replicate`: maps its options to a replica store and a source, runs [`crate::replicate::run`] and
//! prints the report; `replicate points` lists a replica's points.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use crate::cli::{
    OutputFormat, ReplicaPointsArgs, ReplicaTargetArgs, ReplicateAction, ReplicateArgs,
};
use crate::journal::state_dir;
use crate::progress::{Bar, human_size};
use crate::replica::{Point, ReplicaStore};
use crate::replicate::{self, SnapshotDiff, SourceDiff, Spec};
use crate::sources::SourceRef;
use crate::target_kind::ReplicaKind;

/// Where a replica's points are, as the last `replicate` run from this state folder recorded it (so `failover`
/// and `replicate points` need only the name).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TargetRecord {
    /// `file`, `libvirt`.
    pub to: String,
    /// Its options.
    pub dir: Option<PathBuf>,
    /// libvirt URI.
    pub connect: Option<String>,
    /// libvirt pool.
    pub pool: Option<String>,
    /// AWS region, profile and endpoint.
    #[serde(default)]
    pub region: Option<String>,
    /// AWS profile.
    #[serde(default)]
    pub profile: Option<String>,
    /// AWS endpoint URL.
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

fn record_path(cache_dir: &std::path::Path, name: &str) -> PathBuf {
    cache_dir.join(format!("{name}.target.json"))
}

/// Records where replica `name`'s points are.
fn save_record(
    cache_dir: &std::path::Path,
    name: &str,
    to: ReplicaKind,
    t: &ReplicaTargetArgs,
) -> Result<()> {
    let r = TargetRecord {
        to: to.name().into(),
        dir: t
            .dir
            .as_ref()
            .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone())),
        connect: t.connect.clone(),
        pool: t.pool.clone(),
        region: t.region.clone(),
        profile: t.profile.clone(),
        endpoint_url: t.endpoint_url.clone(),
    };
    crate::replica::write_atomic(
        cache_dir,
        &record_path(cache_dir, name),
        &serde_json::to_vec_pretty(&r)?,
    )
}

/// The target kind and options: those given, else the record of the last run from `cache_dir`.
pub fn resolve_target(
    cache_dir: &std::path::Path,
    name: &str,
    to: Option<ReplicaKind>,
    t: &ReplicaTargetArgs,
) -> Result<(ReplicaKind, ReplicaTargetArgs)> {
    let rec: Option<TargetRecord> =
        crate::replica::read_bounded(&record_path(cache_dir, name), 1 << 20)?
            .and_then(|b| serde_json::from_slice(&b).ok());
    let to = match (to, &rec) {
        (Some(k), _) => k,
        (None, Some(r)) => ReplicaKind::from_name(&r.to).with_context(|| {
            format!(
                "the record of replica {name} names an unknown target '{}'",
                r.to
            )
        })?,
        (None, None) => bail!(
            "no replicate of {name} ran from this state folder ({}): give --to and the target's options",
            cache_dir.display()
        ),
    };
    let mut out = t.clone();
    if let Some(r) = rec.filter(|r| r.to == to.name()) {
        out.dir = out.dir.or(r.dir);
        out.connect = out.connect.or(r.connect);
        out.pool = out.pool.or(r.pool);
        out.region = out.region.or(r.region);
        out.profile = out.profile.or(r.profile);
        out.endpoint_url = out.endpoint_url.or(r.endpoint_url);
    }
    Ok((to, out))
}

/// The libvirt URI `t` names: `-c`, else LIBVIRT_DEFAULT_URI, else qemu:///system.
pub fn libvirt_uri(t: &ReplicaTargetArgs) -> String {
    t.connect
        .clone()
        .or_else(|| {
            std::env::var("LIBVIRT_DEFAULT_URI")
                .ok()
                .filter(|v| !v.is_empty())
        })
        .unwrap_or_else(|| "qemu:///system".into())
}

/// The store `to` names with `t`'s options.
pub fn store(
    to: ReplicaKind,
    t: &ReplicaTargetArgs,
    cache_dir: &std::path::Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Box<dyn ReplicaStore>> {
    match to {
        ReplicaKind::Aws => Ok(Box::new(aws_store(t, cache_dir, stop)?)),
        ReplicaKind::File => {
            let Some(dir) = &t.dir else {
                bail!("--to file needs --dir DIR, the folder of the points");
            };
            Ok(Box::new(crate::targets::file::replica::FileStore::new(
                dir, stop,
            )?))
        }
        ReplicaKind::Libvirt => {
            let Some(pool) = &t.pool else {
                bail!("--to libvirt needs --pool POOL, the storage pool of the points");
            };
            Ok(Box::new(
                crate::targets::libvirt::replica::LibvirtStore::new(&libvirt_uri(t), pool, stop)?,
            ))
        }
    }
}

/// A source kind the caller already matched (never reached).
fn unreachable_source(src: &std::path::Path) -> Result<(String, String)> {
    bail!("{}: not an AWS source", src.display())
}

/// The EBS snapshots store `t` names.
pub fn aws_store(
    t: &ReplicaTargetArgs,
    cache_dir: &std::path::Path,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<crate::targets::aws::replica::AwsStore> {
    let conn = crate::targets::aws::config::AwsTarget {
        region: t.region.clone(),
        profile: t.profile.clone(),
        endpoint_url: t.endpoint_url.clone(),
    };
    std::fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    crate::targets::aws::replica::AwsStore::new(
        &conn,
        t.max_attempts,
        t.concurrency,
        cache_dir,
        stop,
    )
}

/// An EBS snapshot source: EBS lists what changed since an earlier snapshot of its lineage.
struct EbsDiff<'a> {
    reader: &'a crate::targets::aws::source::AwsReader,
    snapshot: String,
}

impl SnapshotDiff for EbsDiff<'_> {
    fn how(&self) -> &'static str {
        "ebs-changed-blocks"
    }
    fn changed_since(&self, previous: &str) -> Result<Option<Vec<(u64, u64)>>> {
        match self.reader.changed_blocks(previous, &self.snapshot) {
            Ok(c) => Ok(Some(c.ranges)),
            Err(e) if e.can_hash_instead() => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// `imgshift replicate …`.
pub fn run(args: &ReplicateArgs, quiet: bool) -> Result<u8> {
    if let Some(ReplicateAction::Points(p)) = &args.action {
        return points(p);
    }
    let (Some(src), Some(to), Some(name)) = (&args.src, args.to, &args.name) else {
        bail!("replicate needs SRC, --to and --name");
    };
    replicate::check_name(name)?;
    if args.keep.is_some() && to == ReplicaKind::Libvirt {
        eprintln!(
            "imgshift: --keep is for --to file: libvirt points are layers of one qcow2 chain, each needing the one before it"
        );
        return Ok(2);
    }
    crate::interrupt::install()?;
    let stop = crate::interrupt::stop_flag();
    let cache_dir: PathBuf = state_dir(args.state_dir.as_deref())?.join("replicas");
    std::fs::create_dir_all(&cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    let mut store = store(to, &args.target, &cache_dir, stop.clone())?;
    let source = SourceRef::parse(src)?;
    let mut reader = None;
    let (disk, source_name, source_snapshot): (
        Box<dyn imgshift_converters::DiskSource>,
        String,
        Option<String>,
    ) = match &source {
        SourceRef::File(path) => (
            crate::open::open_image(path, args.format.as_deref(), &args.trust.allow_dirs)?,
            std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.clone())
                .display()
                .to_string(),
            None,
        ),
        SourceRef::AwsSnapshot(_) | SourceRef::AwsVolume(_) => {
            if args.format.is_some() {
                bail!(
                    "-f names a local image's format; an EBS snapshot is read as the raw disk it is"
                );
            }
            let conn = super::migrate::source_conn_of(&args.source, args.target.max_attempts);
            let r = crate::targets::aws::source::AwsReader::connect(&conn.aws, conn.max_attempts)?;
            let (snap, name) = match &source {
                SourceRef::AwsVolume(v) => (r.newest_snapshot_of(v)?, format!("aws:{v}")),
                SourceRef::AwsSnapshot(s) => (s.clone(), format!("aws:{s}")),
                _ => unreachable_source(src)?,
            };
            let d = r.snapshot(&snap)?;
            reader = Some(r);
            (Box::new(d), name, Some(snap))
        }
        _ => bail!(
            "{}: replicate reads local images, aws:snap-ID and aws:vol-ID; copy other cloud disks with \
                 `imgshift convert` first",
            src.display()
        ),
    };
    let disk_format = match &source {
        SourceRef::File(_) => Some(disk.format()),
        _ => None,
    };
    let ebs_diff = match (&reader, &source_snapshot) {
        (Some(r), Some(s)) => Some(EbsDiff {
            reader: r,
            snapshot: s.clone(),
        }),
        _ => None,
    };
    let diff = match (&ebs_diff, &args.bitmap, &source) {
        (Some(d), None, _) => SourceDiff::Snapshots(d),
        (None, Some(b), SourceRef::File(path)) => {
            if disk_format != Some(imgshift_converters::Format::Qcow2) {
                bail!(
                    "--bitmap {b}: {} is not a qcow2 image (persistent dirty bitmaps are a qcow2 feature)",
                    path.display()
                );
            }
            let bm = imgshift_converters::formats::qcow2::bitmaps::read_dirty_bitmap(path, b)
                .with_context(|| format!("--bitmap {b}"))?;
            SourceDiff::Bitmap {
                name: b.clone(),
                ranges: bm
                    .ranges
                    .iter()
                    .map(|&(s, l)| (s, s.saturating_add(l)))
                    .collect(),
            }
        }
        (_, Some(b), _) => bail!("--bitmap {b}: dirty bitmaps are read from a local qcow2 image"),
        (None, None, _) => SourceDiff::None,
    };
    save_record(&cache_dir, name, to, &args.target)?;
    let shared: std::sync::Arc<dyn imgshift_converters::DiskSource> = std::sync::Arc::from(disk);
    let guest = Some(crate::replicate::guest::inspect(shared.clone()));
    let spec = Spec {
        name,
        source_name,
        source_snapshot,
        src: shared.as_ref(),
        diff,
        keep: args.keep,
        cache_dir,
        threads: args.threads.clamp(1, 64),
        stop: &stop,
        guest,
    };
    let bar = Bar::new("replicate", args.progress, quiet);
    let outcome = replicate::run(&spec, store.as_mut(), &bar);
    bar.finish();
    if let Err(e) = crate::interrupt::check() {
        return Ok(e.exit_code());
    }
    let outcome = outcome.with_context(|| format!("replica {name}"))?;
    for w in &outcome.warnings {
        eprintln!("imgshift: warning: {w}");
    }
    let mut out = std::io::stdout().lock();
    match args.output {
        OutputFormat::Json => {
            let mut v = serde_json::to_value(&outcome)?;
            if let Some(o) = v.as_object_mut() {
                o.insert("target".into(), to.name().into());
                o.insert("where".into(), store.describe().into());
            }
            serde_json::to_writer_pretty(&mut out, &v)?;
            writeln!(out)?;
        }
        OutputFormat::Human => match &outcome.point {
            Some(p) => {
                writeln!(
                    out,
                    "replica {name}: point {} made in {} ({}): {} changed ({}), {} sent, {} read from the source",
                    p.number,
                    store.describe(),
                    p.target_id,
                    human_size(outcome.changed_bytes),
                    outcome.detection,
                    human_size(outcome.sent_bytes),
                    human_size(outcome.bytes_read)
                )?;
                if !outcome.deleted.is_empty() {
                    let list: Vec<String> = outcome.deleted.iter().map(u32::to_string).collect();
                    writeln!(out, "deleted point(s) {} (--keep)", list.join(", "))?;
                }
            }
            None => writeln!(
                out,
                "replica {name}: nothing changed since point {} ({} read from the source); no point made",
                outcome
                    .previous
                    .map_or_else(|| "-".into(), |n| n.to_string()),
                human_size(outcome.bytes_read)
            )?,
        },
    }
    Ok(0)
}

/// `imgshift replicate points NAME`.
fn points(args: &ReplicaPointsArgs) -> Result<u8> {
    replicate::check_name(&args.name)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cache_dir = state_dir(args.state_dir.as_deref())?.join("replicas");
    let (to, t) = resolve_target(&cache_dir, &args.name, args.to, &args.target)?;
    let mut store = store(to, &t, &cache_dir, stop)?;
    let points = store.points(&args.name)?;
    let mut out = std::io::stdout().lock();
    match args.output {
        OutputFormat::Json => {
            serde_json::to_writer_pretty(&mut out, &points)?;
            writeln!(out)?;
        }
        OutputFormat::Human => {
            if points.is_empty() {
                writeln!(
                    out,
                    "replica {} has no points in {}",
                    args.name,
                    store.describe()
                )?;
                return Ok(0);
            }
            writeln!(
                out,
                "{:>5}  {:<20}  {:<24}  {:>10}  {:>10}  {:<18}  SOURCE",
                "POINT", "CREATED", "TARGET ID", "CHANGED", "SENT", "DETECTION"
            )?;
            for p in &points {
                writeln!(out, "{}", row(p))?;
            }
        }
    }
    Ok(0)
}

fn row(p: &Point) -> String {
    let source = match &p.source_snapshot {
        Some(s) => format!("{} ({s})", p.source),
        None => p.source.clone(),
    };
    format!(
        "{:>5}  {:<20}  {:<24}  {:>10}  {:>10}  {:<18}  {source}",
        p.number,
        p.created,
        p.target_id,
        human_size(p.changed_bytes),
        human_size(p.sent_bytes),
        p.detection
    )
}
