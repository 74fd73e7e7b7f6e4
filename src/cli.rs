//! Command-line arguments (clap derive types only; each subcommand calls one function in `commands/`).

use std::path::PathBuf;

use crate::target_kind::TargetKind;
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Move virtual machine disks between formats and clouds.
#[derive(Debug, Parser)]
#[command(name = "imgshift", version = env!("IMGSHIFT_VERSION"), about, max_term_width = 100)]
pub struct Cli {
    /// Print no progress bars.
    #[arg(long, short = 'q', global = true)]
    pub quiet: bool,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Output style of the inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Readable text.
    #[default]
    Human,
    /// One JSON document on standard output.
    Json,
}

/// Options about files named inside images (backing files, extents, parents).
#[derive(Debug, Clone, Args, Default)]
pub struct TrustArgs {
    /// Also follow files named inside the image when they lie in DIR (by default only the image's own folder
    /// is trusted). Repeatable.
    #[arg(long = "allow-dir", value_name = "DIR")]
    pub allow_dirs: Vec<PathBuf>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show an image's format, sizes, backing file and allocation (--output json uses qemu-img's field names).
    #[command(
        after_help = "Examples:\n  imgshift info disk.qcow2\n  imgshift info --output json disk.vmdk\n  imgshift info appliance.ova            # the boot disk, plus every disk the OVF lists"
    )]
    Info {
        /// The image.
        image: PathBuf,
        /// Image format (probed by magic when absent).
        #[arg(short = 'f', long = "format", value_name = "FMT")]
        format: Option<String>,
        /// Also show every backing file of the chain (as qemu-img info --backing-chain; JSON: an array).
        #[arg(long = "backing-chain")]
        backing_chain: bool,
        /// Output style.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(
            flatten,
            next_help_heading = "Cloud sources (aws:snap-ID, aws:ami-ID, azure:disk/GROUP/NAME, libvirt:POOL/VOLUME)"
        )]
        cloud: CloudSourceArgs,
    },
    /// Print the allocation map of an image (like qemu-img map).
    Map {
        /// The image.
        image: PathBuf,
        /// Image format (probed when absent).
        #[arg(short = 'f', long = "format", value_name = "FMT")]
        format: Option<String>,
        /// Output style.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(
            flatten,
            next_help_heading = "Cloud sources (aws:snap-ID, aws:ami-ID, azure:disk/GROUP/NAME, libvirt:POOL/VOLUME)"
        )]
        cloud: CloudSourceArgs,
    },
    /// Check an image's metadata. Exit 0 clean, 2 corruption, 3 leaked clusters only, 1 error, 63 no checks for
    /// this format.
    #[command(
        after_help = "Examples:\n  imgshift check disk.qcow2\n  imgshift check --output json disk.vhdx\n  imgshift check -r leaks disk.qcow2             # repaired copy: disk.repaired.qcow2\n  imgshift check --repair leaks --in-place disk.qcow2"
    )]
    Check {
        /// The image.
        image: PathBuf,
        /// Image format (probed when absent).
        #[arg(short = 'f', long = "format", value_name = "FMT")]
        format: Option<String>,
        /// Repair (qcow2): 'leaks' sets the refcount of clusters nothing references back to what the metadata
        /// says, as qemu-img check -r leaks. Into a copy (--into, default NAME.repaired.EXT beside the image)
        /// unless --in-place.
        #[arg(short = 'r', long = "repair", value_name = "WHAT", value_parser = ["leaks"])]
        repair: Option<String>,
        /// With --repair: modify the image itself instead of a copy.
        #[arg(long = "in-place", requires = "repair", conflicts_with = "into")]
        in_place: bool,
        /// With --repair: the repaired copy to write (must not exist).
        #[arg(long, value_name = "FILE", requires = "repair")]
        into: Option<PathBuf>,
        /// Output style.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        #[command(flatten)]
        trust: TrustArgs,
    },
    /// Compare two images' contents. Exit 0 identical, 1 different (first offset printed), 2 error.
    Compare {
        /// First image.
        a: PathBuf,
        /// Second image.
        b: PathBuf,
        /// Format of the first image.
        #[arg(short = 'f', value_name = "FMT")]
        format_a: Option<String>,
        /// Format of the second image.
        #[arg(short = 'F', value_name = "FMT")]
        format_b: Option<String>,
        /// Strict mode: images of different sizes differ.
        #[arg(short = 's', long)]
        strict: bool,
        /// Show a progress bar.
        #[arg(short = 'p', long)]
        progress: bool,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(
            flatten,
            next_help_heading = "Cloud sources (aws:snap-ID, aws:ami-ID, azure:disk/GROUP/NAME, libvirt:POOL/VOLUME)"
        )]
        cloud: CloudSourceArgs,
    },
    /// Inspect the guest inside an image (read-only): partitions, filesystems, OS, boot mode, boot drivers.
    /// With --target, a preflight verdict: exit 0 ok or warn, 1 fail or error.
    #[command(
        after_help = "Examples:\n  imgshift inspect disk.qcow2\n  imgshift inspect disk.vmdk --target aws --boot-mode uefi\n  imgshift inspect disk.vhd --target libvirt --output json"
    )]
    Inspect {
        /// The image.
        image: PathBuf,
        /// Image format (probed when absent).
        #[arg(short = 'f', long = "format", value_name = "FMT")]
        format: Option<String>,
        /// Check the guest against a target's boot requirements.
        #[arg(long, value_name = "TARGET", value_enum)]
        target: Option<TargetKind>,
        /// With --target aws: the boot mode the AMI will be registered with (as `upload aws --boot-mode`).
        #[arg(long = "boot-mode", value_parser = ["legacy-bios", "uefi", "uefi-preferred"])]
        boot_mode: Option<String>,
        /// Output style.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        /// Print, as one JSON line on standard error: bytes read from the guest, the process's rchar (from
        /// /proc/self/io) and its peak RSS.
        #[arg(long)]
        stats: bool,
        #[command(flatten)]
        trust: TrustArgs,
        #[command(
            flatten,
            next_help_heading = "Cloud sources (aws:snap-ID, aws:ami-ID, azure:disk/GROUP/NAME, libvirt:POOL/VOLUME)"
        )]
        cloud: CloudSourceArgs,
    },
    /// How large an output a conversion needs (as qemu-img measure): required and fully allocated size.
    #[command(
        after_help = "Examples:\n  imgshift measure -O qcow2 disk.vmdk\n  imgshift measure -O vpc -o subformat=fixed disk.qcow2 --target azure"
    )]
    Measure(MeasureArgs),
    /// Convert an image to another format. DST '-' writes to standard output.
    #[command(
        after_help = "Examples:\n  imgshift convert -p -O qcow2 disk.vmdk disk.qcow2\n  imgshift convert -O vmdk -o subformat=streamOptimized disk.qcow2 disk.vmdk\n  imgshift convert -O vpc -o subformat=fixed,round_to_mib=on disk.qcow2 azure.vhd\n  imgshift convert -O qcow2 -o help       # the options of an output format"
    )]
    Convert(ConvertArgs),
    /// Strip machine-specific state (machine-id, SSH host keys, logs, ...) offline into a qcow2 overlay whose
    /// backing file is the untouched source (libguestfs's virt-sysprep does the writes).
    Generalize(GeneralizeArgs),
    /// Stream an image into a cloud or hypervisor target (no temporary disk).
    Upload {
        /// The target.
        #[command(subcommand)]
        target: UploadTarget,
    },
    /// Read a cloud disk back into a local image.
    Download {
        /// The source.
        #[command(subcommand)]
        target: DownloadTarget,
    },
    /// Move a VM image to AWS, Azure or libvirt in one resumable job: inspect and preflight, generalise
    /// (optional), stream and upload (no temporary disk), register, verify, report
    #[command(
        after_help = "Examples:\n  imgshift migrate web01.vmdk --to aws --name web01\n  imgshift migrate web01.vmdk --to azure -g my-rg -l westeurope --subscription SUB\n  imgshift migrate web01.vmdk --to libvirt --pool default --start\n  imgshift migrate web01.vmdk --to aws --dry-run     # inspect, preflight and plan only"
    )]
    Migrate(Box<MigrateArgs>),
    /// Keep a disaster-recovery copy current: each run makes a recovery point holding only what changed since
    /// the last (`replicate points NAME` lists them)
    #[command(
        after_help = "Examples:\n  imgshift replicate web01.qcow2 --to file --dir /srv/dr --name web01 --keep 7\n  imgshift replicate points web01 --to file --dir /srv/dr\n\nRun it from cron or a systemd timer: a run takes the replica's lock, and one that finds nothing changed\nmakes no point and says so."
    )]
    Replicate(Box<ReplicateArgs>),
    /// Make a replica's recovery point (the newest unless --point) bootable: an AMI over its EBS snapshot, or a
    /// libvirt domain on an overlay of its volume (the point stays as it was)
    #[command(
        after_help = "Examples:\n  imgshift failover web01 --start                    # the target from the replica's record in the state folder\n  imgshift failover web01 --point 3 --to libvirt --pool dr -c qemu:///system --domain web01-test"
    )]
    Failover(Box<FailoverArgs>),
    /// Continue an interrupted job (`migrate` or `upload`) where it stopped
    Resume {
        /// The job id (`imgshift jobs` lists them)
        job: String,
        /// Folder of job journals (default `$XDG_STATE_HOME/imgshift/jobs`)
        #[arg(long = "state-dir", value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// After migration: list, share, copy to other regions and delete the images imgshift made (AWS, Azure;
    /// libvirt: list and delete)
    #[command(
        after_help = "Examples:\n  imgshift images list --on aws\n  imgshift images share ami-0abc --on aws --accounts 111122223333\n  imgshift images copy ami-0abc --on aws --to-regions eu-west-1,us-west-2\n  imgshift images delete ami-0abc --on aws --dry-run\n  imgshift images list --on azure --subscription SUB -g RG\n  imgshift images share 1.0.0 --on azure --subscription SUB -g RG --gallery G --gallery-image D --principal OBJECT_ID\n  imgshift images list --on libvirt -c qemu:///system"
    )]
    Images {
        /// What to do
        #[command(subcommand)]
        action: ImagesAction,
    },
    /// List unfinished jobs with their stage and progress; `jobs cancel JOB` removes what a job created
    Jobs {
        #[command(subcommand)]
        action: Option<JobsAction>,
        /// Folder of job journals (default `$XDG_STATE_HOME/imgshift/jobs`)
        #[arg(long = "state-dir", value_name = "DIR", global = true)]
        state_dir: Option<PathBuf>,
        /// Output format
        #[arg(long, value_enum, default_value_t, global = true)]
        output: OutputFormat,
    },
    /// Print a shell completion script on standard output (e.g. `imgshift completions bash >
    /// /etc/bash_completion.d/imgshift`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on standard output (`imgshift man | man -l -`).
    Man,
}

/// `imgshift convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image.
    #[arg(required_unless_present = "options")]
    pub src: Option<PathBuf>,
    /// Destination file, or '-' for standard output (a pipe gets every byte, zeros included; a regular file
    /// redirected with '>' gets holes as a named file does).
    #[arg(required_unless_present = "options")]
    pub dst: Option<String>,
    /// Output format: raw, qcow2, vpc (vhd), vhdx, vmdk, vdi.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Source format (probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output options, qemu-img style: key=value[,key=value...]. Repeatable. '-o help' lists the output
    /// format's options with their defaults.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Compress the output (qcow2; for VMDK use -o subformat=streamOptimized, which is always compressed).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Parallel read/compress workers (default: one per CPU, 2 to 16).
    #[arg(short = 'm', long = "threads", value_name = "N")]
    pub threads: Option<usize>,
    /// Output cache mode, as qemu-img's -t: 'unsafe' never syncs (qemu-img convert's default); 'writeback'
    /// syncs the output before renaming it into place, so it survives a power loss once the command returns.
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_enum, default_value_t = CacheMode::Unsafe)]
    pub cache: CacheMode,
    /// Print conversion statistics as JSON on standard error when done.
    #[arg(long)]
    pub stats: bool,
    /// Write into DST as it exists (-O raw: a file or block device; -O qcow2: an image, through its own tables;
    /// -O vpc: a fixed VHD), at least as large as the source, as qemu-img convert -n: DST is not created,
    /// truncated or renamed; ranges that are zero in the source are written as zeros unless --target-is-zero.
    #[arg(short = 'n')]
    pub no_create: bool,
    /// With -n: DST already reads as zeros, so zero ranges are skipped (as qemu-img's --target-is-zero; wrong
    /// if it does not).
    #[arg(long = "target-is-zero", requires = "no_create")]
    pub target_is_zero: bool,
    /// For an OVA source: the disk to convert, by its index in `imgshift info` (default: the boot disk, 0).
    #[arg(long, value_name = "N")]
    pub disk: Option<usize>,
    /// Generalise the guest on the way (as `imgshift generalize`; OPS as its --operations, default its default
    /// set), through a temporary overlay that is removed afterwards; the source is never modified.
    #[arg(long, value_name = "OPS", num_args = 0..=1, require_equals = true, default_missing_value = "defaults")]
    pub generalize: Option<String>,
    #[command(flatten)]
    pub trust: TrustArgs,
    #[command(
        flatten,
        next_help_heading = "Cloud sources (aws:snap-ID, aws:ami-ID, azure:disk/GROUP/NAME, libvirt:POOL/VOLUME)"
    )]
    pub cloud: CloudSourceArgs,
}

/// `imgshift measure`.
#[derive(Debug, Args)]
pub struct MeasureArgs {
    /// Source image.
    pub image: PathBuf,
    /// Output format: raw, qcow2, vpc (vhd), vhdx, vmdk, vdi.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Source format (probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output options, as for convert. Repeatable.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Also print what a cloud target needs: aws (the EBS volume size in GiB), azure (the upload size in bytes).
    #[arg(long, value_name = "TARGET", value_parser = ["aws", "azure"])]
    pub target: Option<String>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// Where `upload` sends the disk.
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per run; Azure's larger arguments are boxed
pub enum UploadTarget {
    /// Stream the disk into an EBS snapshot (EBS direct APIs) and register an AMI.
    Aws(AwsUploadArgs),
    /// Stream the disk into an Azure managed disk (fixed VHD, Put Page) and create an image.
    Azure(Box<AzureUploadArgs>),
    /// Stream the disk into a libvirt storage volume and optionally define (and start) a domain using it.
    Libvirt(LibvirtUploadArgs),
}

/// Where `download` reads from.
#[derive(Debug, Subcommand)]
pub enum DownloadTarget {
    /// Read an EBS snapshot back into a local image of any format.
    Aws(AwsDownloadArgs),
}

/// Where a cloud source is read from, for the commands that only read (`info`, `map`, `inspect`, `compare`,
/// `convert`). SRC `aws:snap-ID` is an EBS snapshot, `aws:ami-ID` an AMI's boot disk; a path is a local image.
#[derive(Debug, Clone, Args, Default)]
pub struct CloudSourceArgs {
    /// AWS region of an aws: source (default: from the environment or profile).
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// AWS profile for an aws: source.
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// EBS/EC2 endpoint URL for an aws: source (also AWS_ENDPOINT_URL).
    #[arg(long = "endpoint-url", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Subscription of an azure: source.
    #[arg(long, env = "AZURE_SUBSCRIPTION_ID", value_name = "ID")]
    pub subscription: Option<String>,
    /// Azure Resource Manager endpoint for an azure: source.
    #[arg(
        long = "arm-endpoint",
        value_name = "URL",
        default_value = "https://management.azure.com"
    )]
    pub arm_endpoint: String,
    /// Extra CA certificates (PEM) to trust for an azure: source.
    #[arg(long = "ca-bundle", value_name = "FILE", env = "IMGSHIFT_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// libvirt connection URI for a libvirt: source.
    #[arg(
        long = "connect",
        env = "LIBVIRT_DEFAULT_URI",
        default_value = "qemu:///system",
        value_name = "URI"
    )]
    pub connect: String,
    /// Read a running libvirt domain (libvirt:domain/NAME) anyway: its disks change while they are read, so the
    /// copy is crash-consistent at best.
    #[arg(long = "allow-running")]
    pub allow_running: bool,
}

/// Where `migrate`'s cloud source is read from (its target's options keep their own names).
#[derive(Debug, Clone, Args, Default)]
pub struct MigrateSourceArgs {
    /// AWS region of an aws: source (default: from the environment or profile).
    #[arg(id = "source_region", long = "source-region", value_name = "REGION")]
    pub region: Option<String>,
    /// AWS profile for an aws: source.
    #[arg(id = "source_profile", long = "source-profile", value_name = "NAME")]
    pub profile: Option<String>,
    /// EBS/EC2 endpoint URL for an aws: source (default: AWS_ENDPOINT_URL).
    #[arg(
        id = "source_endpoint_url",
        long = "source-endpoint-url",
        value_name = "URL"
    )]
    pub endpoint_url: Option<String>,
    /// Subscription of an azure: source (default: AZURE_SUBSCRIPTION_ID).
    #[arg(
        id = "source_subscription",
        long = "source-subscription",
        value_name = "ID"
    )]
    pub subscription: Option<String>,
    /// Azure Resource Manager endpoint for an azure: source.
    #[arg(
        id = "source_arm_endpoint",
        long = "source-arm-endpoint",
        value_name = "URL",
        default_value = "https://management.azure.com"
    )]
    pub arm_endpoint: String,
    /// Extra CA certificates (PEM) to trust for an azure: source (default: IMGSHIFT_CA_BUNDLE).
    #[arg(
        id = "source_ca_bundle",
        long = "source-ca-bundle",
        value_name = "FILE"
    )]
    pub ca_bundle: Option<PathBuf>,
    /// libvirt connection URI for a libvirt: source (default: LIBVIRT_DEFAULT_URI, else qemu:///system).
    #[arg(id = "source_connect", long = "source-connect", value_name = "URI")]
    pub connect: Option<String>,
    /// Read a running libvirt domain (libvirt:domain/NAME) anyway: its disks change while they are read, so the
    /// copy is crash-consistent at best.
    #[arg(long = "allow-running")]
    pub allow_running: bool,
}

/// AWS connection options.
#[derive(Debug, Clone, Args, Default)]
pub struct AwsConnArgs {
    /// AWS region (default: from the environment or profile).
    #[arg(long)]
    pub region: Option<String>,
    /// Named profile from ~/.aws/config.
    #[arg(long)]
    pub profile: Option<String>,
    /// Endpoint URL (also read from AWS_ENDPOINT_URL).
    #[arg(long = "endpoint-url", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Attempts per request for retryable failures (throttling, 5xx, timeouts).
    #[arg(long = "max-attempts", default_value_t = 10, value_name = "N")]
    pub max_attempts: u32,
}

/// `imgshift upload aws`.
#[derive(Debug, Args)]
pub struct AwsUploadArgs {
    /// Source image (any supported format).
    pub src: PathBuf,
    /// AMI name (required unless --snapshot-only).
    #[arg(long, required_unless_present = "snapshot_only")]
    pub name: Option<String>,
    /// Description for the snapshot and the AMI.
    #[arg(long)]
    pub description: Option<String>,
    #[command(flatten)]
    pub conn: AwsConnArgs,
    /// CPU architecture of the guest.
    #[arg(long, default_value = "x86_64", value_parser = ["x86_64", "arm64"])]
    pub architecture: String,
    /// Boot mode to register (default: EC2's choice).
    #[arg(long = "boot-mode", value_parser = ["legacy-bios", "uefi", "uefi-preferred"])]
    pub boot_mode: Option<String>,
    /// Register the AMI without ENA support (ENA is on by default).
    #[arg(long = "no-ena")]
    pub no_ena: bool,
    /// Register the AMI with NitroTPM 2.0.
    #[arg(long = "tpm-v2")]
    pub tpm_v2: bool,
    /// Require IMDSv2 on instances of the AMI.
    #[arg(long = "imds-v2-required")]
    pub imds_v2_required: bool,
    /// Root volume type.
    #[arg(long = "volume-type", default_value = "gp3", value_parser = ["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"])]
    pub volume_type: String,
    /// Root device name.
    #[arg(long = "root-device", default_value = "/dev/xvda")]
    pub root_device: String,
    /// Encrypt the snapshot (every block is then written, zeros included).
    #[arg(long)]
    pub encrypted: bool,
    /// KMS key for encryption (implies --encrypted).
    #[arg(long = "kms-key-id", value_name = "ARN")]
    pub kms_key_id: Option<String>,
    /// Tag for the snapshot and the AMI. Repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Stop after the snapshot; register no AMI.
    #[arg(long = "snapshot-only", conflicts_with_all = ["copy_to_regions", "share_with", "launch_template"])]
    pub snapshot_only: bool,
    #[command(flatten)]
    pub after: AwsAfterArgs,
    /// PutSnapshotBlock requests in flight.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub concurrency: usize,
    /// Source format (probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Folder for job journals (default: $XDG_STATE_HOME/imgshift/jobs).
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Generalise the guest on the way (as `imgshift generalize`; OPS as its --operations, default its default
    /// set plus this target's), through an overlay kept beside the job's journal until the upload completes (a
    /// resumed upload sends the same bytes); the source is never modified.
    #[arg(long, value_name = "OPS", num_args = 0..=1, require_equals = true, default_missing_value = "defaults")]
    pub generalize: Option<String>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Print each step on standard error.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// What `migrate --to aws` and `upload aws` do once the AMI exists: copies, sharing, a launch template (each a
/// resumable stage of the job; `jobs cancel` undoes them).
#[derive(Debug, Clone, Args, Default)]
pub struct AwsAfterArgs {
    /// Copy the AMI to these regions (CopyImage with a token derived from the AMI; copies tagged and waited for)
    #[arg(long = "copy-to-regions", value_delimiter = ',', value_name = "R1,R2")]
    pub copy_to_regions: Vec<String>,
    /// Let these AWS accounts (12 digits) launch the AMI and its copies (their snapshots too)
    #[arg(long = "share-with", value_delimiter = ',', value_name = "ID,...")]
    pub share_with: Vec<String>,
    /// Point this launch template at the AMI: created when absent, else a new version is added (its default
    /// version is left as it is)
    #[arg(long = "launch-template", value_name = "NAME")]
    pub launch_template: Option<String>,
    /// Instance type of the launch template (default: one that boots the AMI's architecture, boot mode and
    /// ENA setting: t4g.micro for arm64, t3.micro with ENA, t2.micro for a BIOS guest without ENA)
    #[arg(
        long = "instance-type",
        value_name = "TYPE",
        requires = "launch_template"
    )]
    pub instance_type: Option<String>,
}

/// `imgshift download aws`.
#[derive(Debug, Args)]
pub struct AwsDownloadArgs {
    /// The snapshot id (snap-...).
    pub snapshot_id: String,
    /// Destination file.
    pub dst: PathBuf,
    /// Output format.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Output options, qemu-img style. Repeatable.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    #[command(flatten)]
    pub conn: AwsConnArgs,
    /// Parallel block reads.
    #[arg(short = 'm', long = "threads", default_value_t = 16, value_name = "N")]
    pub threads: usize,
    /// Output cache mode, as in `convert`: 'unsafe' never syncs, 'writeback' syncs before the rename.
    #[arg(short = 't', long = "cache", value_name = "CACHE", value_enum, default_value_t = CacheMode::Unsafe)]
    pub cache: CacheMode,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(short = 'p', long)]
    pub progress: bool,
}

/// `imgshift upload azure`.
#[derive(Debug, Args)]
pub struct AzureUploadArgs {
    /// Source image (any supported format).
    pub src: PathBuf,
    /// Subscription id.
    #[arg(long, env = "AZURE_SUBSCRIPTION_ID")]
    pub subscription: String,
    /// Resource group (must exist).
    #[arg(long = "resource-group", short = 'g')]
    pub resource_group: String,
    /// Azure region of the disk and image (e.g. westeurope).
    #[arg(long, short = 'l')]
    pub location: String,
    /// Name of the managed disk to create.
    #[arg(long = "disk-name")]
    pub disk_name: String,
    /// Create an image of this name from the disk.
    #[arg(long = "image-name")]
    pub image_name: Option<String>,
    /// Gallery for a gallery image version (with --gallery-image and --gallery-version).
    #[arg(long, requires_all = ["gallery_image", "gallery_version"])]
    pub gallery: Option<String>,
    /// Gallery image definition.
    #[arg(long = "gallery-image", requires = "gallery")]
    pub gallery_image: Option<String>,
    /// Gallery image version (X.Y.Z).
    #[arg(long = "gallery-version", requires = "gallery")]
    pub gallery_version: Option<String>,
    /// Guest OS type; auto = Windows when inspection finds a Windows system root, else Linux.
    #[arg(long = "os-type", default_value = "auto", value_parser = ["auto", "linux", "windows"])]
    pub os_type: String,
    /// Hyper-V generation; auto = V2 when the disk has a GPT with an EFI system partition, else V1.
    #[arg(long = "hyper-v-generation", default_value = "auto", value_parser = ["V1", "V2", "auto"])]
    pub hyper_v_generation: String,
    /// Disk storage SKU.
    #[arg(long, default_value = "Standard_LRS", value_parser = ["Standard_LRS", "Premium_LRS", "StandardSSD_LRS"])]
    pub sku: String,
    /// Tag for the disk and the image. Repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Azure Resource Manager endpoint (https).
    #[arg(
        long = "arm-endpoint",
        value_name = "URL",
        default_value = "https://management.azure.com"
    )]
    pub arm_endpoint: String,
    /// Extra trusted CA certificates (PEM) for HTTPS, e.g. of a TLS-inspecting proxy.
    #[arg(long = "ca-bundle", value_name = "FILE", env = "IMGSHIFT_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// Lifetime of the write SAS requested from the disk, in seconds.
    #[arg(
        long = "access-duration",
        default_value_t = 86400,
        value_name = "SECONDS"
    )]
    pub access_duration: u64,
    /// 4 MiB windows uploaded in parallel.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub concurrency: usize,
    /// Attempts per request for retryable failures (throttling, 5xx, timeouts).
    #[arg(long = "max-attempts", default_value_t = 10, value_name = "N")]
    pub max_attempts: u32,
    /// Source format (probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Folder for job journals (default: $XDG_STATE_HOME/imgshift/jobs).
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Generalise the guest on the way (as `imgshift generalize`; OPS as its --operations, default its default
    /// set plus this target's), through an overlay kept beside the job's journal until the upload completes (a
    /// resumed upload sends the same bytes); the source is never modified.
    #[arg(long, value_name = "OPS", num_args = 0..=1, require_equals = true, default_missing_value = "defaults")]
    pub generalize: Option<String>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Print each step on standard error.
    #[arg(short = 'v', long)]
    pub verbose: bool,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// `imgshift upload libvirt`.
#[derive(Debug, Args)]
pub struct LibvirtUploadArgs {
    /// Source image (any supported format; an OVA's boot disk).
    pub src: PathBuf,
    /// libvirt connection URI (qemu:///system, qemu:///session, qemu:///system?socket=PATH, ...).
    #[arg(
        short = 'c',
        long,
        env = "LIBVIRT_DEFAULT_URI",
        default_value = "qemu:///system",
        value_name = "URI"
    )]
    pub connect: String,
    /// Storage pool that receives the volume (must be running).
    #[arg(long)]
    pub pool: String,
    /// Name of the volume to create.
    #[arg(long)]
    pub volume: String,
    /// Volume format.
    #[arg(short = 'O', value_name = "FMT", value_enum, default_value_t = LibvirtVolFormat::Qcow2)]
    pub output_format: LibvirtVolFormat,
    /// Replace an existing volume (deleted before the upload starts) and, with --define, an existing stopped
    /// domain of the same name.
    #[arg(long)]
    pub overwrite: bool,
    /// Define a domain of this name that boots from the volume.
    #[arg(long, value_name = "NAME")]
    pub define: Option<String>,
    /// Domain memory in MiB.
    #[arg(long, default_value_t = 1024, value_name = "MiB", requires = "define")]
    pub memory: u64,
    /// Domain virtual CPUs.
    #[arg(long, default_value_t = 1, value_name = "N", requires = "define")]
    pub vcpus: u32,
    /// Firmware (auto: from inspection, UEFI when the guest boots only by UEFI, else BIOS; without a
    /// Linux root, UEFI when a GPT holds an EFI system partition).
    #[arg(long, value_enum, default_value_t = FirmwareArg::Auto, requires = "define")]
    pub firmware: FirmwareArg,
    /// Disk bus (auto: from inspection, virtio when the guest's initramfs has the virtio drivers, scsi when it
    /// has only virtio-scsi, else sata).
    #[arg(long = "disk-bus", value_enum, default_value_t = DiskBusArg::Auto, requires = "define")]
    pub disk_bus: DiskBusArg,
    /// Domain type (auto: kvm when the host offers KVM, else qemu, i.e. TCG emulation).
    #[arg(long = "domain-type", value_enum, default_value_t = DomainTypeArg::Auto, requires = "define")]
    pub domain_type: DomainTypeArg,
    /// Attach a network interface on this libvirt network (virtio; e1000e for a Windows guest without netkvm).
    #[arg(long, value_name = "NAME", requires = "define")]
    pub network: Option<String>,
    /// Also log the guest's serial console to this file (an absolute path on the daemon's host).
    #[arg(long = "serial-log", value_name = "FILE", requires = "define")]
    pub serial_log: Option<PathBuf>,
    /// Start the defined domain.
    #[arg(long, requires = "define")]
    pub start: bool,
    /// Source format (probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Folder for the job's journal while it runs (default: $XDG_STATE_HOME/imgshift/jobs); a failed upload
    /// removes what it created and its journal.
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// `upload libvirt -O`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LibvirtVolFormat {
    /// qcow2 (only data clusters are stored).
    Qcow2,
    /// Raw (sparse where the pool allows).
    Raw,
}

/// `upload libvirt --firmware`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FirmwareArg {
    /// From inspection (see --firmware).
    Auto,
    /// Legacy BIOS.
    Bios,
    /// UEFI (OVMF, Secure Boot off).
    Uefi,
}

/// `upload libvirt --disk-bus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DiskBusArg {
    /// From inspection (see --disk-bus).
    Auto,
    /// virtio-blk.
    Virtio,
    /// SATA (AHCI).
    Sata,
    /// SCSI on virtio-scsi.
    Scsi,
}

/// `upload libvirt --domain-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DomainTypeArg {
    /// kvm when the host's capabilities offer it, else qemu.
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// TCG emulation.
    Qemu,
}

/// `-t`: when a local output is made durable (qemu-img's cache mode names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    /// No syncs (qemu-img convert's default).
    Unsafe,
    /// Sync the data before the rename, then the folder.
    Writeback,
}

impl CacheMode {
    /// The library's durability for this mode.
    pub fn durability(self) -> imgshift_converters::Durability {
        match self {
            CacheMode::Unsafe => imgshift_converters::Durability::Unsafe,
            CacheMode::Writeback => imgshift_converters::Durability::Writeback,
        }
    }
}

/// `imgshift generalize`.
#[derive(Debug, Args)]
pub struct GeneralizeArgs {
    /// The source image (opened read-only; never modified).
    #[arg(required_unless_present = "list_operations")]
    pub image: Option<PathBuf>,
    /// The qcow2 overlay to write (its backing file is IMAGE, format recorded).
    #[arg(long, value_name = "OUT.qcow2", required_unless_present_any = ["list_operations", "dry_run"])]
    pub overlay: Option<PathBuf>,
    /// Operations, comma-separated: NAME adds, -NAME removes, 'defaults' adds the default set; only
    /// removals start from the defaults. Default: the default set.
    #[arg(long, value_name = "OPS", allow_hyphen_values = true)]
    pub operations: Option<String>,
    /// Add the operations that matter for this target (e.g. the Azure agent's state).
    #[arg(long, value_enum)]
    pub target: Option<GeneralizeTarget>,
    /// Set this hostname in the guest.
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    /// Inspect and list what would be removed; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// List the operations and exit.
    #[arg(long)]
    pub list_operations: bool,
    /// Source format (probed when absent).
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Output style.
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// `--target` of generalize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GeneralizeTarget {
    /// An AWS AMI.
    Aws,
    /// An Azure image.
    Azure,
    /// A libvirt domain.
    Libvirt,
}

/// `imgshift jobs` actions.
#[derive(Debug, Subcommand)]
pub enum JobsAction {
    /// Delete the target resources an unfinished job created (and only those), then forget the job
    Cancel {
        /// The job id
        job: String,
    },
}

/// Arguments of `imgshift migrate`.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Source image (any supported format, or an OVA with one or more disks)
    pub src: PathBuf,
    /// Target
    #[arg(long, value_enum)]
    pub to: TargetKind,
    /// Name of what is made: the AMI, the Azure image (disks NAME-os, NAME-data1, ...), the libvirt domain
    /// (volumes NAME.qcow2, NAME-data1.qcow2, ..., or .raw). Default: the source file's name without its extension
    #[arg(long)]
    pub name: Option<String>,
    /// Generalise the guest first (virt-sysprep operations; the default set when no list is given)
    #[arg(long, value_name = "OPS", num_args = 0..=1, require_equals = true, default_missing_value = "defaults")]
    pub generalize: Option<String>,
    /// Go on even when the preflight verdict is "fail"
    #[arg(long)]
    pub force: bool,
    /// Inspect, run the preflight and print the plan; touch no target
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// Do not ask for confirmation (needed when standard input is not a terminal)
    #[arg(long, short = 'y')]
    pub yes: bool,
    /// Output format of the final report
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Source format (probed when absent)
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Folder of job journals (default `$XDG_STATE_HOME/imgshift/jobs`)
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Say what each step does
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Tag for what is created (repeatable; AWS and Azure)
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Requests in flight (default: AWS 64, Azure 16)
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Attempts per request before giving up (AWS and Azure)
    #[arg(long = "max-attempts", default_value_t = 10, value_name = "N")]
    pub max_attempts: u32,
    #[command(flatten, next_help_heading = "AWS (--to aws)")]
    pub aws: MigrateAwsArgs,
    #[command(flatten, next_help_heading = "Azure (--to azure)")]
    pub azure: MigrateAzureArgs,
    #[command(flatten, next_help_heading = "libvirt (--to libvirt)")]
    pub libvirt: MigrateLibvirtArgs,
    #[command(flatten, next_help_heading = "Files named inside images")]
    pub trust: TrustArgs,
    #[command(
        flatten,
        next_help_heading = "Cloud source (SRC = aws:snap-ID, aws:ami-ID, azure:disk/GROUP/NAME or libvirt:POOL/VOLUME)"
    )]
    pub source: MigrateSourceArgs,
}

/// `migrate --to aws` options (as in `upload aws`).
#[derive(Debug, Clone, Args, Default)]
pub struct MigrateAwsArgs {
    /// AWS region (default from the environment or profile)
    #[arg(long)]
    pub region: Option<String>,
    /// AWS profile
    #[arg(long)]
    pub profile: Option<String>,
    /// Endpoint URL for EC2 and EBS (a stand-in such as moto)
    #[arg(long = "endpoint-url", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// AMI description
    #[arg(long)]
    pub description: Option<String>,
    /// Architecture
    #[arg(long, default_value = "x86_64", value_parser = ["x86_64", "arm64"])]
    pub architecture: String,
    /// Boot mode (default: from inspection)
    #[arg(long = "boot-mode", value_parser = ["legacy-bios", "uefi", "uefi-preferred"])]
    pub boot_mode: Option<String>,
    /// Do not mark the AMI ENA-capable
    #[arg(long = "no-ena")]
    pub no_ena: bool,
    /// NitroTPM 2.0
    #[arg(long = "tpm-v2")]
    pub tpm_v2: bool,
    /// Require IMDSv2
    #[arg(long = "imds-v2-required")]
    pub imds_v2_required: bool,
    /// Volume type of every disk
    #[arg(long = "volume-type", default_value = "gp3", value_parser = ["gp3", "gp2", "io1", "io2", "st1", "sc1", "standard"])]
    pub volume_type: String,
    /// Encrypt the snapshots (the account's default KMS key unless --kms-key-id)
    #[arg(long)]
    pub encrypted: bool,
    /// KMS key for the snapshots
    #[arg(long = "kms-key-id", value_name = "ARN")]
    pub kms_key_id: Option<String>,
    #[command(flatten)]
    pub after: AwsAfterArgs,
}

/// `migrate --to azure` options (as in `upload azure`).
#[derive(Debug, Clone, Args, Default)]
pub struct MigrateAzureArgs {
    /// Subscription id
    #[arg(long, env = "AZURE_SUBSCRIPTION_ID")]
    pub subscription: Option<String>,
    /// Resource group
    #[arg(long = "resource-group", short = 'g')]
    pub resource_group: Option<String>,
    /// Region (location)
    #[arg(long, short = 'l')]
    pub location: Option<String>,
    /// Also publish a gallery image version (with --gallery-image and --gallery-version)
    #[arg(long, requires_all = ["gallery_image", "gallery_version"])]
    pub gallery: Option<String>,
    /// Gallery image definition
    #[arg(long = "gallery-image", requires = "gallery")]
    pub gallery_image: Option<String>,
    /// Gallery image version (e.g. 1.0.0)
    #[arg(long = "gallery-version", requires = "gallery")]
    pub gallery_version: Option<String>,
    /// Guest OS type (auto: Windows when inspection finds a Windows system root, else Linux)
    #[arg(long = "os-type", default_value = "auto", value_parser = ["auto", "linux", "windows"])]
    pub os_type: String,
    /// Hyper-V generation (auto: from inspection)
    #[arg(long = "hyper-v-generation", default_value = "auto", value_parser = ["V1", "V2", "auto"])]
    pub hyper_v_generation: String,
    /// Disk SKU
    #[arg(long, default_value = "Standard_LRS", value_parser = ["Standard_LRS", "Premium_LRS", "StandardSSD_LRS"])]
    pub sku: String,
    /// Azure Resource Manager endpoint
    #[arg(
        long = "arm-endpoint",
        value_name = "URL",
        default_value = "https://management.azure.com"
    )]
    pub arm_endpoint: String,
    /// Extra CA certificates (PEM) to trust
    #[arg(long = "ca-bundle", value_name = "FILE", env = "IMGSHIFT_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
    /// Lifetime of each write SAS, in seconds
    #[arg(
        long = "access-duration",
        default_value_t = 86400,
        value_name = "SECONDS"
    )]
    pub access_duration: u64,
}

/// `migrate --to libvirt` options (as in `upload libvirt`).
#[derive(Debug, Clone, Args)]
pub struct MigrateLibvirtArgs {
    /// libvirt connection URI
    #[arg(
        short = 'c',
        long,
        env = "LIBVIRT_DEFAULT_URI",
        default_value = "qemu:///system",
        value_name = "URI"
    )]
    pub connect: String,
    /// Storage pool for the volumes
    #[arg(long)]
    pub pool: Option<String>,
    /// Volume format
    #[arg(long = "volume-format", value_enum, default_value_t = LibvirtVolFormat::Qcow2)]
    pub volume_format: LibvirtVolFormat,
    /// Memory in MiB
    #[arg(long, default_value_t = 1024, value_name = "MiB")]
    pub memory: u64,
    /// Virtual CPUs
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u32,
    /// Firmware (auto: from inspection, UEFI when the guest boots only by UEFI, else BIOS; without a Linux
    /// root, UEFI when a GPT holds an EFI system partition)
    #[arg(long, value_enum, default_value_t = FirmwareArg::Auto)]
    pub firmware: FirmwareArg,
    /// Disk bus (auto: from inspection, virtio when the guest's initramfs has the virtio drivers, scsi when it
    /// has only virtio-scsi, else sata)
    #[arg(long = "disk-bus", value_enum, default_value_t = DiskBusArg::Auto)]
    pub disk_bus: DiskBusArg,
    /// Domain type (auto: kvm when the host offers it)
    #[arg(long = "domain-type", value_enum, default_value_t = DomainTypeArg::Auto)]
    pub domain_type: DomainTypeArg,
    /// Network to attach (virtio NIC; e1000e for a Windows guest without netkvm)
    #[arg(long, value_name = "NAME")]
    pub network: Option<String>,
    /// Write the serial console to this file (absolute path on the daemon's host)
    #[arg(long = "serial-log", value_name = "FILE")]
    pub serial_log: Option<PathBuf>,
    /// Start the domain once defined
    #[arg(long)]
    pub start: bool,
}

/// Azure options of the `images` commands.
#[derive(Debug, Clone, Args, Default)]
pub struct ImagesAzureArgs {
    /// Subscription id
    #[arg(long, env = "AZURE_SUBSCRIPTION_ID")]
    pub subscription: Option<String>,
    /// Resource group
    #[arg(long = "resource-group", short = 'g')]
    pub resource_group: Option<String>,
    /// The image is a version of this gallery's image definition --gallery-image
    #[arg(long, requires = "gallery_image")]
    pub gallery: Option<String>,
    /// Gallery image definition (with --gallery)
    #[arg(long = "gallery-image", requires = "gallery")]
    pub gallery_image: Option<String>,
    /// Azure Resource Manager endpoint
    #[arg(
        long = "arm-endpoint",
        value_name = "URL",
        default_value = "https://management.azure.com"
    )]
    pub arm_endpoint: String,
    /// Extra CA certificates (PEM) to trust
    #[arg(long = "ca-bundle", value_name = "FILE", env = "IMGSHIFT_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
}

/// Options every `images` command takes.
#[derive(Debug, Clone, Args)]
pub struct ImagesCommon {
    /// The cloud
    #[arg(long, value_enum)]
    pub on: TargetKind,
    /// AWS connection
    #[command(flatten)]
    pub aws: AwsConnArgs,
    /// Azure connection and gallery
    #[command(flatten)]
    pub azure: ImagesAzureArgs,
    /// libvirt connection URI (with --on libvirt)
    #[arg(
        short = 'c',
        long,
        env = "LIBVIRT_DEFAULT_URI",
        default_value = "qemu:///system",
        value_name = "URI"
    )]
    pub connect: String,
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
}

/// Whom `images share`/`unshare` is about (exactly one).
#[derive(Debug, Clone, Args)]
#[group(required = true, multiple = false)]
pub struct ShareWith {
    /// AWS account ids (12 digits), comma-separated
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub accounts: Vec<String>,
    /// An AWS Organizations organization ARN
    #[arg(long, value_name = "ARN")]
    pub org: Option<String>,
    /// An organizational unit ARN
    #[arg(long, value_name = "ARN")]
    pub ou: Option<String>,
    /// Everyone (AWS: checks image block public access first; Azure: a community gallery)
    #[arg(long)]
    pub public: bool,
    /// Azure: a Microsoft Entra principal's object id, given the Reader role on the gallery image
    #[arg(long, value_name = "OBJECT_ID")]
    pub principal: Option<String>,
    /// Azure: subscription ids, through a direct-shared gallery's sharing profile
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub subscriptions: Vec<String>,
    /// Azure: tenant ids, through a direct-shared gallery's sharing profile
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub tenants: Vec<String>,
}

/// `imgshift images` actions.
#[derive(Debug, Subcommand)]
pub enum ImagesAction {
    /// The images imgshift made (tagged imgshift:job), with their snapshots or disks, regions and sharing
    List {
        /// Every image the account owns, not only imgshift's
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        common: ImagesCommon,
    },
    /// Deregister an AMI, then delete each of its snapshots no other AMI uses
    Delete {
        /// The AMI id (Azure: the image, or the version of --gallery/--gallery-image; libvirt: the domain)
        image: String,
        /// Print exactly what would be removed; remove nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        common: ImagesCommon,
    },
    /// Let other accounts, an organization or OU, or everyone launch an AMI (its snapshots too, for accounts);
    /// Azure: a gallery image, to a principal (Reader role) or through a direct-shared or community gallery
    Share {
        /// The AMI id (Azure: the image, or the version of --gallery/--gallery-image; libvirt: the domain)
        image: String,
        #[command(flatten)]
        with: ShareWith,
        #[command(flatten)]
        common: ImagesCommon,
    },
    /// Remove what `images share` granted
    Unshare {
        /// The AMI id (Azure: the image, or the version of --gallery/--gallery-image; libvirt: the domain)
        image: String,
        #[command(flatten)]
        with: ShareWith,
        #[command(flatten)]
        common: ImagesCommon,
    },
    /// Copy an AMI to other regions (one copy per region, however often it is run), wait, copy its tags; Azure:
    /// replicate a gallery image version to more regions
    Copy {
        /// The AMI id (Azure: the image, or the version of --gallery/--gallery-image; libvirt: the domain)
        image: String,
        /// Destination regions, comma-separated
        #[arg(
            long = "to-regions",
            value_delimiter = ',',
            required = true,
            value_name = "R1,R2"
        )]
        to_regions: Vec<String>,
        /// Encrypt the copies (with --kms-key-id, else the account's default EBS key)
        #[arg(long)]
        encrypted: bool,
        /// KMS key for the copies
        #[arg(long = "kms-key-id", value_name = "KEY")]
        kms_key_id: Option<String>,
        #[command(flatten)]
        common: ImagesCommon,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand's arguments are consistent (unique ids and names, valid defaults): clap checks this
    /// only when a subcommand is first used, so a clash would otherwise surface as a panic at run time.
    #[test]
    fn every_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<super::Cli, clap::Error> {
        use clap::Parser;
        super::Cli::try_parse_from(std::iter::once("imgshift").chain(args.iter().copied()))
    }

    #[test]
    fn after_stage_flags_of_migrate_and_upload_aws() {
        let after = "--copy-to-regions=eu-west-1,us-west-2 --share-with=111122223333,222233334444 \
                     --launch-template=web --instance-type=t3.small";
        let mut m = vec!["migrate", "a.raw", "--to", "aws"];
        m.extend(after.split_whitespace());
        let Ok(super::Cli {
            command: super::Command::Migrate(a),
            ..
        }) = parse(&m)
        else {
            panic!("migrate did not parse");
        };
        assert_eq!(a.aws.after.copy_to_regions, ["eu-west-1", "us-west-2"]);
        assert_eq!(a.aws.after.share_with, ["111122223333", "222233334444"]);
        assert_eq!(a.aws.after.launch_template.as_deref(), Some("web"));
        assert_eq!(a.aws.after.instance_type.as_deref(), Some("t3.small"));
        let mut u = vec!["upload", "aws", "a.raw", "--name", "n"];
        u.extend(after.split_whitespace());
        assert!(parse(&u).is_ok());
        // --instance-type belongs to a launch template; --snapshot-only registers nothing to act on.
        assert!(
            parse(&[
                "upload",
                "aws",
                "a.raw",
                "--name",
                "n",
                "--instance-type",
                "t3.small"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "upload",
                "aws",
                "a.raw",
                "--snapshot-only",
                "--share-with",
                "111122223333"
            ])
            .is_err()
        );
    }

    #[test]
    fn azure_share_flags_are_one_of_the_grantees() {
        let base = ["images", "share", "1.0.0", "--on", "azure"];
        for extra in [
            &["--principal", "0a1b2c3d-0000-4000-8000-00000000beef"][..],
            &["--subscriptions", "a,b"],
            &["--tenants", "t"],
            &["--public"],
        ] {
            let args: Vec<&str> = base.iter().chain(extra).copied().collect();
            assert!(parse(&args).is_ok(), "{args:?}");
        }
        let two: Vec<&str> = base
            .iter()
            .chain(&["--principal", "p", "--public"])
            .copied()
            .collect();
        assert!(parse(&two).is_err());
    }
}

/// Arguments of `imgshift replicate`.
#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct ReplicateArgs {
    /// Other actions on a replica
    #[command(subcommand)]
    pub action: Option<ReplicateAction>,
    /// The source: an image file (any supported format), aws:snap-ID (an EBS snapshot) or aws:vol-ID (that
    /// volume's newest completed snapshot; later runs read only the blocks EBS lists as changed)
    #[arg(required = true)]
    pub src: Option<PathBuf>,
    /// Where the recovery points go
    #[arg(long, value_enum, required = true)]
    pub to: Option<crate::target_kind::ReplicaKind>,
    /// The replica's name (names its points: files or volumes NAME.N.qcow2)
    #[arg(long, required = true)]
    pub name: Option<String>,
    /// Keep at most N points: the oldest beyond N are deleted after a new point is made (the next point
    /// keeps its content; --to file)
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: Option<u32>,
    /// Read what changed from the source qcow2's persistent dirty bitmap NAME (qemu's incremental-backup
    /// tracking: `qemu-img bitmap --add IMG NAME`, or QMP block-dirty-bitmap-add with persistent=true) instead of
    /// hashing the source. Used once the previous point was made with the same bitmap; keep the bitmap (clear it
    /// only right after a run)
    #[arg(long, value_name = "NAME")]
    pub bitmap: Option<String>,
    /// Source format (probed when absent)
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Folder of imgshift's state: replica locks and cached block hashes under DIR/replicas (default
    /// `$XDG_STATE_HOME/imgshift/jobs`)
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Output format of the report
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Threads reading the source
    #[arg(short = 'm', long = "threads", value_name = "N", default_value_t = 8)]
    pub threads: usize,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(short = 'p', long)]
    pub progress: bool,
    #[command(flatten, next_help_heading = "Where the points go")]
    pub target: ReplicaTargetArgs,
    #[command(flatten, next_help_heading = "Files named inside images")]
    pub trust: TrustArgs,
    #[command(
        flatten,
        next_help_heading = "Cloud source (SRC = aws:snap-ID or aws:vol-ID: its newest completed snapshot)"
    )]
    pub source: ReplicateSourceArgs,
}

/// Where `replicate`'s EBS source is read from (the target's options keep their own names).
#[derive(Debug, Clone, Args, Default)]
pub struct ReplicateSourceArgs {
    /// AWS region of an aws: source (default: from the environment or profile)
    #[arg(id = "source_region", long = "source-region", value_name = "REGION")]
    pub region: Option<String>,
    /// AWS profile for an aws: source
    #[arg(id = "source_profile", long = "source-profile", value_name = "NAME")]
    pub profile: Option<String>,
    /// EBS/EC2 endpoint URL for an aws: source (default: AWS_ENDPOINT_URL)
    #[arg(
        id = "source_endpoint_url",
        long = "source-endpoint-url",
        value_name = "URL"
    )]
    pub endpoint_url: Option<String>,
}

/// `imgshift replicate` actions.
#[derive(Debug, Clone, Subcommand)]
pub enum ReplicateAction {
    /// List a replica's recovery points (number, time, the target's id, source, changed and sent bytes)
    Points(ReplicaPointsArgs),
}

/// Arguments of `imgshift replicate points`.
#[derive(Debug, Clone, Args)]
pub struct ReplicaPointsArgs {
    /// The replica's name
    pub name: String,
    /// Where its points are (default: as the last `replicate` of NAME from this state folder recorded)
    #[arg(long, value_enum)]
    pub to: Option<crate::target_kind::ReplicaKind>,
    /// Output format
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    /// Folder of imgshift's state (default `$XDG_STATE_HOME/imgshift/jobs`)
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten, next_help_heading = "Where the points are")]
    pub target: ReplicaTargetArgs,
}

/// Where a replica's points are.
#[derive(Debug, Clone, Args, Default)]
pub struct ReplicaTargetArgs {
    /// The folder of the points (`--to file`)
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// libvirt connection URI (`--to libvirt`; default: LIBVIRT_DEFAULT_URI, else qemu:///system)
    #[arg(short = 'c', long = "connect", value_name = "URI")]
    pub connect: Option<String>,
    /// Storage pool of the points (`--to libvirt`)
    #[arg(long, value_name = "POOL")]
    pub pool: Option<String>,
    /// AWS region of the points (`--to aws`; default from the environment or profile)
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// AWS profile (`--to aws`)
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// Endpoint URL for EC2 and EBS (`--to aws`; a stand-in such as moto)
    #[arg(long = "endpoint-url", value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// Requests in flight (`--to aws`)
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub concurrency: usize,
    /// Attempts per request before giving up (AWS)
    #[arg(long = "max-attempts", default_value_t = 10, value_name = "N")]
    pub max_attempts: u32,
}

/// Arguments of `imgshift failover`.
#[derive(Debug, Clone, Args)]
pub struct FailoverArgs {
    /// The replica's name
    pub name: String,
    /// The point to start (default: the newest)
    #[arg(long, value_name = "N")]
    pub point: Option<u32>,
    /// Where the points are (default: as the last `replicate` of NAME from this state folder recorded)
    #[arg(long, value_enum)]
    pub to: Option<crate::target_kind::ReplicaKind>,
    /// Name of the domain to define (libvirt; default: NAME-failover)
    #[arg(long, value_name = "NAME")]
    pub domain: Option<String>,
    /// Name of the AMI to register (aws; default: NAME-point-N)
    #[arg(long = "image-name", value_name = "NAME")]
    pub image_name: Option<String>,
    /// The AMI's boot mode (aws; default: what inspection found when the point was made)
    #[arg(long = "boot-mode", value_parser = ["legacy-bios", "uefi", "uefi-preferred"])]
    pub boot_mode: Option<String>,
    /// The AMI's architecture (aws)
    #[arg(long, default_value = "x86_64", value_parser = ["x86_64", "arm64"])]
    pub architecture: String,
    /// Start the domain
    #[arg(long)]
    pub start: bool,
    /// Go on even when the point's preflight verdict for the target is "fail"
    #[arg(long)]
    pub force: bool,
    /// Folder of imgshift's state (default `$XDG_STATE_HOME/imgshift/jobs`)
    #[arg(long = "state-dir", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Output format of the report
    #[arg(long, value_enum, default_value_t)]
    pub output: OutputFormat,
    #[command(flatten, next_help_heading = "Where the points are")]
    pub target: ReplicaTargetArgs,
    /// Memory in MiB
    #[arg(
        long,
        default_value_t = 1024,
        value_name = "MiB",
        help_heading = "The domain"
    )]
    pub memory: u64,
    /// Virtual CPUs
    #[arg(
        long,
        default_value_t = 1,
        value_name = "N",
        help_heading = "The domain"
    )]
    pub vcpus: u32,
    /// Firmware (auto: the boot mode inspection found when the point was made)
    #[arg(long, value_enum, default_value_t = FirmwareArg::Auto, help_heading = "The domain")]
    pub firmware: FirmwareArg,
    /// Disk bus (auto: virtio when the guest has the drivers, as inspection found when the point was made)
    #[arg(long = "disk-bus", value_enum, default_value_t = DiskBusArg::Auto, help_heading = "The domain")]
    pub disk_bus: DiskBusArg,
    /// Domain type (auto: kvm when the host offers it)
    #[arg(long = "domain-type", value_enum, default_value_t = DomainTypeArg::Auto, help_heading = "The domain")]
    pub domain_type: DomainTypeArg,
    /// libvirt network to attach
    #[arg(long, value_name = "NAME", help_heading = "The domain")]
    pub network: Option<String>,
    /// File on the daemon's host that receives the serial console
    #[arg(long = "serial-log", value_name = "FILE", help_heading = "The domain")]
    pub serial_log: Option<PathBuf>,
}
