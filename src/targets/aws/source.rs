//! EBS snapshots and AMIs as sources (`aws:snap-...`, `aws:ami-...`): an AMI's EBS block device mappings, boot
//! disk first, each read as an [`EbsSnapshotSource`], with the facts the AMI carries (boot mode, architecture,
//! ENA) so another cloud can be told the same. Nothing is written on AWS and nothing locally.

use std::sync::Arc;

use anyhow::{Context, Result, bail};

use super::config::{self, AwsTarget as AwsConn};
use super::download::{ChangedBlocksError, ChangedRanges, EbsSnapshotSource};
use super::retry::{self, Policy};
use crate::targets::limiter::Limiter;

/// ListChangedBlocks pages in flight at once through one reader (the account's quota is 50 requests/s; a page
/// lists up to 10000 blocks, so a handful in flight is plenty); throttling lowers it to one.
const LIST_IN_FLIGHT: usize = 4;
/// Successes before one more list request may be in flight again.
const LIST_RAMP_UP_EVERY: u64 = 8;

/// What an AMI says about its guest and disks.
#[derive(Debug, Clone, Default)]
pub struct ImageFacts {
    /// `(device name, snapshot id)` of each EBS mapping, the root device's first, then by device name.
    pub disks: Vec<(String, String)>,
    /// `legacy-bios`, `uefi`, `uefi-preferred`, or none registered.
    pub boot_mode: Option<String>,
    /// `x86_64`, `arm64`...
    pub architecture: Option<String>,
    /// Whether the AMI is marked ENA-capable.
    pub ena: Option<bool>,
}

/// A connection to EBS and EC2 for reading, with its own runtime.
pub struct AwsReader {
    rt: Arc<tokio::runtime::Runtime>,
    ebs: aws_sdk_ebs::Client,
    ec2: aws_sdk_ec2::Client,
    policy: Policy,
    region: String,
    /// Shared by this reader's list calls (ListChangedBlocks), lowered by throttling.
    list_limiter: Arc<Limiter>,
}

impl AwsReader {
    /// Connects (credentials resolved once, before any request).
    pub fn connect(conn: &AwsConn, max_attempts: u32) -> Result<AwsReader> {
        let rt = Arc::new(crate::targets::runtime()?);
        let sdk = rt.block_on(config::load(conn));
        let Some(region) = sdk.region().map(|r| r.to_string()) else {
            bail!("no AWS region for the source: pass the region option or set AWS_REGION");
        };
        rt.block_on(config::check_credentials(&sdk))?;
        Ok(AwsReader {
            ebs: aws_sdk_ebs::Client::new(&sdk),
            ec2: aws_sdk_ec2::Client::new(&sdk),
            policy: Policy {
                max_attempts: max_attempts.max(1),
                ..Policy::default()
            },
            region,
            rt,
            list_limiter: Limiter::new(LIST_IN_FLIGHT, 1, LIST_RAMP_UP_EVERY),
        })
    }

    /// Snapshot `id` as a disk source (its block list read now).
    pub fn snapshot(&self, id: &str) -> Result<EbsSnapshotSource> {
        let s = EbsSnapshotSource::open(
            self.rt.handle().clone(),
            self.ebs.clone(),
            self.policy,
            id,
        )
        .with_context(|| {
            format!(
                "cannot list the blocks of snapshot {id} in {} (an encrypted snapshot needs kms:Decrypt on its key)",
                self.region
            )
        })?;
        Ok(s.owning(Arc::clone(&self.rt)))
    }

    /// The blocks that differ between `first_snapshot` and `second_snapshot` (ListChangedBlocks, every page), as
    /// sorted 512 KiB-aligned byte ranges of the second. [`ChangedBlocksError::can_hash_instead`] tells a caller
    /// when to compare hashes instead (snapshots of different lineages, one deleted).
    pub fn changed_blocks(
        &self,
        first_snapshot: &str,
        second_snapshot: &str,
    ) -> std::result::Result<ChangedRanges, ChangedBlocksError> {
        self.rt.block_on(super::download::list_changed(
            &self.ebs,
            &self.policy,
            &self.list_limiter,
            first_snapshot,
            second_snapshot,
        ))
    }

    /// The newest completed snapshot of EBS volume `volume_id` (DescribeSnapshots, by start time).
    pub fn newest_snapshot_of(&self, volume_id: &str) -> Result<String> {
        self.rt
            .block_on(newest_completed_snapshot(
                &self.ec2,
                &self.policy,
                volume_id,
            ))
            .with_context(|| {
                format!(
                    "cannot find a snapshot of volume {volume_id} in {}",
                    self.region
                )
            })
    }

    /// What AMI `id` maps and says about its guest.
    pub fn image(&self, id: &str) -> Result<ImageFacts> {
        let ec2 = self.ec2.clone();
        let out = self
            .rt
            .block_on(retry::with_retry(
                &self.policy,
                "DescribeImages",
                |_| {},
                || ec2.describe_images().image_ids(id).send(),
            ))
            .with_context(|| format!("cannot describe AMI {id} in {}", self.region))?;
        let Some(img) = out.images().first() else {
            bail!("no AMI {id} in {}", self.region);
        };
        let root = img.root_device_name().unwrap_or_default().to_string();
        let mut disks: Vec<(String, String)> = img
            .block_device_mappings()
            .iter()
            .filter_map(|m| {
                let snap = m.ebs()?.snapshot_id()?;
                Some((m.device_name()?.to_string(), snap.to_string()))
            })
            .collect();
        if disks.is_empty() {
            bail!("AMI {id} maps no EBS snapshot (instance-store AMIs cannot be read)");
        }
        disks.sort_by(|a, b| (a.0 != root, &a.0).cmp(&(b.0 != root, &b.0)));
        Ok(ImageFacts {
            disks,
            boot_mode: img.boot_mode().map(|b| b.as_str().to_string()),
            architecture: img.architecture().map(|a| a.as_str().to_string()),
            ena: img.ena_support(),
        })
    }
}

/// DescribeSnapshots pages read at most when looking for a volume's snapshots (1000 per page).
const MAX_SNAPSHOT_PAGES: usize = 100;

/// The id of the newest `completed` snapshot of `volume_id` (by StartTime; ties broken by id), or an error
/// saying none is completed yet.
pub async fn newest_completed_snapshot(
    ec2: &aws_sdk_ec2::Client,
    policy: &Policy,
    volume_id: &str,
) -> Result<String> {
    use aws_sdk_ec2::types::{Filter, SnapshotState};
    let mut best: Option<(aws_smithy_types::DateTime, String)> = None;
    let mut pending = 0usize;
    let mut token: Option<String> = None;
    for _ in 0..MAX_SNAPSHOT_PAGES {
        let out = retry::with_retry(
            policy,
            "DescribeSnapshots",
            |_| {},
            || {
                ec2.describe_snapshots()
                    .filters(
                        Filter::builder()
                            .name("volume-id")
                            .values(volume_id)
                            .build(),
                    )
                    .max_results(1000)
                    .set_next_token(token.clone())
                    .send()
            },
        )
        .await?;
        for snap in out.snapshots() {
            let (Some(id), Some(start)) = (snap.snapshot_id(), snap.start_time()) else {
                continue;
            };
            if snap.volume_id() != Some(volume_id) {
                continue;
            }
            if snap.state() != Some(&SnapshotState::Completed) {
                pending += 1;
                continue;
            }
            let newer = best.as_ref().is_none_or(|(t, b)| {
                (start.secs(), start.subsec_nanos(), id) > (t.secs(), t.subsec_nanos(), b.as_str())
            });
            if newer {
                best = Some((*start, id.to_string()));
            }
        }
        match out.next_token() {
            Some(t) if !t.is_empty() && Some(t) != token.as_deref() => token = Some(t.to_string()),
            _ => break,
        }
    }
    match best {
        Some((_, id)) => Ok(id),
        None if pending > 0 => bail!(
            "volume {volume_id} has {pending} snapshot(s), none completed yet: wait for one to complete"
        ),
        None => {
            bail!("volume {volume_id} has no snapshot: snapshot it first (aws ec2 create-snapshot)")
        }
    }
}

/// The change API and the incremental writer against the moto stand-in (its EBS direct model corrected by
/// tests/standins/moto_launcher.py, the corrections tested in tests/standin_moto.rs). Fails, saying how to start
/// it, when moto is not reachable. Contents are checked through boto3 (an independent client), not imgshift.
#[cfg(test)]
mod standin_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::journal::{DiskPart, JobState, Journal, Ledger};
    use crate::targets::aws::EBS_BLOCK_SIZE as B;
    use crate::targets::aws::download::{self, ChangedBlocksError};
    use crate::targets::aws::upload::{self as up, SnapshotRequest, UploaderOptions};

    /// moto's URL: IMGSHIFT_MOTO_URL, else the one `.ci/standins start` recorded.
    fn moto_url() -> String {
        let url = std::env::var("IMGSHIFT_MOTO_URL").ok().or_else(|| {
            let dir = std::env::var("IMGSHIFT_STANDIN_DIR")
                .unwrap_or_else(|_| "/var/tmp/imgshift-standins".into());
            let env = std::fs::read_to_string(Path::new(&dir).join("standins.env")).ok()?;
            env.lines()
                .find_map(|l| l.strip_prefix("IMGSHIFT_MOTO_URL=").map(str::to_string))
        });
        let url = url.expect(
            "moto's address is unknown: start the stand-ins with `bash .ci/standins start` (or set IMGSHIFT_MOTO_URL)",
        );
        let host = url.trim_start_matches("http://").trim_end_matches('/');
        assert!(
            std::net::TcpStream::connect(host).is_ok(),
            "moto is not answering at {url}: start the stand-ins with `bash .ci/standins start`"
        );
        url
    }

    struct Moto {
        rt: Arc<tokio::runtime::Runtime>,
        ebs: aws_sdk_ebs::Client,
        ec2: aws_sdk_ec2::Client,
        url: String,
    }

    fn moto() -> Moto {
        let url = moto_url();
        let creds = aws_credential_types::Credentials::new("t", "t", None, None, "test");
        let region = aws_config::Region::new("us-east-1");
        let ebs = aws_sdk_ebs::Client::from_conf(
            aws_sdk_ebs::Config::builder()
                .behavior_version(aws_config::BehaviorVersion::latest())
                .region(region.clone())
                .endpoint_url(&url)
                .credentials_provider(creds.clone())
                .build(),
        );
        let ec2 = aws_sdk_ec2::Client::from_conf(
            aws_sdk_ec2::Config::builder()
                .behavior_version(aws_config::BehaviorVersion::latest())
                .region(region)
                .endpoint_url(&url)
                .credentials_provider(creds)
                .build(),
        );
        Moto {
            rt: Arc::new(crate::targets::runtime().unwrap()),
            ebs,
            ec2,
            url,
        }
    }

    /// A disk of `blocks` 512 KiB blocks, block i filled with `fill[i]`.
    fn disk(path: &Path, fill: &[u8]) -> Box<dyn imgshift_converters::DiskSource> {
        let mut bytes = Vec::new();
        for &f in fill {
            bytes.extend(std::iter::repeat_n(f, B as usize));
        }
        std::fs::write(path, &bytes).unwrap();
        crate::open::open_image(path, Some("raw"), &[]).unwrap()
    }

    fn ledger(dir: &Path, id: &str, block_count: u64) -> Ledger {
        let (j, _) = Journal::open_or_create(
            dir,
            JobState {
                id: id.into(),
                kind: "test".into(),
                disks: vec![DiskPart {
                    block_count,
                    ..DiskPart::default()
                }],
                ..JobState::default()
            },
        )
        .unwrap();
        Ledger::new(Arc::new(Mutex::new(j)), 0)
    }

    /// Writes `src`'s `ranges` into a new snapshot (a child of `parent` when given), completed; its id.
    fn write(
        m: &Moto,
        dir: &Path,
        src: &dyn imgshift_converters::DiskSource,
        ranges: &[(u64, u64)],
        parent: Option<&str>,
    ) -> (String, u64) {
        let token = format!("t{}", rand::random::<u64>());
        let req = SnapshotRequest {
            volume_gib: 1,
            client_token: &token,
            tags: &[("imgshift-replica".to_string(), "test".to_string())],
            parent_snapshot_id: parent,
            ..SnapshotRequest::default()
        };
        let policy = Policy::default();
        let (id, _) =
            m.rt.block_on(up::start_snapshot(&m.ebs, &policy, &req))
                .unwrap();
        let block_count = (1 << 30) / B;
        let l = ledger(dir, &token, block_count);
        let counts = up::stream_ranges(
            &m.rt,
            &m.ebs,
            &id,
            src,
            ranges,
            block_count,
            l.clone(),
            UploaderOptions {
                concurrency: 4,
                policy,
            },
            Arc::new(|_| {}),
            false,
        )
        .unwrap();
        let put = l.bitmap().unwrap().count();
        assert_eq!(put, counts.blocks_put);
        m.rt.block_on(up::complete_snapshot(&m.ebs, &policy, &id, put))
            .unwrap();
        (id, counts.blocks_put)
    }

    /// sha256 of the first `blocks` blocks of `snap`, read with boto3 (missing blocks as zeros).
    fn boto_sha(m: &Moto, snap: &str, blocks: u64) -> String {
        let py = std::env::var("IMGSHIFT_VENV").unwrap_or_else(|_| "/var/tmp/imgshift-venv".into());
        let out = std::process::Command::new(Path::new(&py).join("bin/python"))
            .arg("-c")
            .arg(format!(
                "import boto3,hashlib\n\
                 e=boto3.client('ebs',endpoint_url='{}',region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
                 B=524288; t={{b['BlockIndex']:b['BlockToken'] for b in e.list_snapshot_blocks(SnapshotId='{snap}')['Blocks']}}\n\
                 h=hashlib.sha256()\n\
                 for i in range({blocks}):\n\
                 \x20 h.update(e.get_snapshot_block(SnapshotId='{snap}',BlockIndex=i,BlockToken=t[i])['BlockData'].read() if i in t else bytes(B))\n\
                 print(h.hexdigest())",
                m.url
            ))
            .output()
            .expect("python of the stand-ins' venv: run `bash .ci/standins start` (it installs boto3)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn sha_file(path: &Path) -> String {
        use sha2::Digest as _;
        let d = sha2::Sha256::digest(std::fs::read(path).unwrap());
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn an_incremental_snapshot_holds_its_parent_plus_the_changed_ranges_and_list_changed_finds_them()
     {
        let m = moto();
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("v1.raw");
        let v2 = dir.path().join("v2.raw");
        let a = disk(&v1, &[1, 2, 0, 4, 5, 0]);
        let (parent, put1) = write(&m, dir.path(), a.as_ref(), &[(0, 6 * B)], None);
        // Every block of the ranges is put, zeros included.
        assert_eq!(put1, 6);
        // Block 1 changed, block 3 became zeros, block 5 got data; the rest is as before.
        let b = disk(&v2, &[1, 9, 0, 0, 5, 6]);
        // moto reports StartTime in whole seconds (EC2 in milliseconds): a second apart, the child is newer.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let changed = [(B, 2 * B), (3 * B, 4 * B), (5 * B, 6 * B)];
        let (child, put2) = write(&m, dir.path(), b.as_ref(), &changed, Some(&parent));
        assert_eq!(put2, 3, "only the changed blocks are put");

        // Read back by another client: the child equals the changed disk, the parent the original.
        assert_eq!(boto_sha(&m, &child, 6), sha_file(&v2));
        assert_eq!(boto_sha(&m, &parent, 6), sha_file(&v1));

        // ListChangedBlocks: exactly the changed blocks, as byte ranges.
        let lim = Limiter::new(4, 1, 8);
        let policy = Policy::default();
        let c =
            m.rt.block_on(download::list_changed(
                &m.ebs, &policy, &lim, &parent, &child,
            ))
            .unwrap();
        assert_eq!(c.ranges, changed.to_vec());
        assert_eq!(c.blocks, 3);
        assert_eq!(c.volume_bytes, 1 << 30);

        // A snapshot of another lineage: a typed error that says hashing may replace the diff.
        let (other, _) = write(&m, dir.path(), a.as_ref(), &[(0, B)], None);
        let e =
            m.rt.block_on(download::list_changed(
                &m.ebs, &policy, &lim, &parent, &other,
            ))
            .unwrap_err();
        assert!(matches!(e, ChangedBlocksError::Unrelated { .. }), "{e}");
        assert!(e.can_hash_instead());
        let e =
            m.rt.block_on(download::list_changed(
                &m.ebs,
                &policy,
                &lim,
                "snap-0123456789abcdef0",
                &child,
            ))
            .unwrap_err();
        assert!(matches!(e, ChangedBlocksError::NotFound { .. }), "{e}");

        // The child carries the tags it was started with.
        let tags =
            m.rt.block_on(m.ec2.describe_snapshots().snapshot_ids(&child).send())
                .unwrap()
                .snapshots()[0]
                .tags()
                .iter()
                .map(|t| (t.key().unwrap().to_string(), t.value().unwrap().to_string()))
                .collect::<Vec<_>>();
        assert!(
            tags.contains(&("imgshift-replica".to_string(), "test".to_string())),
            "{tags:?}"
        );

        // An unknown parent is refused at once (the API's ResourceNotFoundException), not retried.
        let req = SnapshotRequest {
            volume_gib: 1,
            client_token: "unknown-parent",
            parent_snapshot_id: Some("snap-0123456789abcdef0"),
            ..SnapshotRequest::default()
        };
        let e =
            m.rt.block_on(up::start_snapshot(&m.ebs, &policy, &req))
                .unwrap_err();
        let call = e
            .downcast_ref::<crate::targets::aws::retry::CallError>()
            .unwrap();
        assert_eq!(call.code.as_deref(), Some("ResourceNotFoundException"));
        assert_eq!(call.attempts, 1);

        // The volume's newest completed snapshot is the child (a child joins its parent's volume).
        let vol =
            m.rt.block_on(m.ec2.describe_snapshots().snapshot_ids(&parent).send())
                .unwrap()
                .snapshots()[0]
                .volume_id()
                .unwrap()
                .to_string();
        let newest =
            m.rt.block_on(newest_completed_snapshot(&m.ec2, &policy, &vol))
                .unwrap();
        assert_eq!(newest, child);
    }

    #[test]
    fn list_changed_follows_every_page() {
        // 101 blocks only in the child, with pages of 100 (the API's smallest MaxResults): two pages. The disk
        // is sparse zeros; put as explicit zero blocks they are still blocks the parent lacks.
        let m = moto();
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.raw");
        let a = disk(&one, &[7]);
        let (parent, _) = write(&m, dir.path(), a.as_ref(), &[(0, B)], None);
        let zeros = dir.path().join("zeros.raw");
        std::fs::File::create(&zeros)
            .unwrap()
            .set_len(102 * B)
            .unwrap();
        let z = crate::open::open_image(&zeros, Some("raw"), &[]).unwrap();
        let (child, put) = write(&m, dir.path(), z.as_ref(), &[(B, 102 * B)], Some(&parent));
        assert_eq!(put, 101);
        let lim = Limiter::new(4, 1, 8);
        let c =
            m.rt.block_on(download::list_changed_paged(
                &m.ebs,
                &Policy::default(),
                &lim,
                &parent,
                &child,
                100,
            ))
            .unwrap();
        assert_eq!(c.ranges, vec![(B, 102 * B)]);
        assert_eq!(c.blocks, 101);
    }
}
