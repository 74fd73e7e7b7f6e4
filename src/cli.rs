//! Command-line arguments (clap derive types only; each subcommand calls one function in `commands/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Move virtual machine disks between formats and clouds.
#[derive(Debug, Parser)]
#[command(name = "imgshift", version, about, max_term_width = 100)]
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
    /// JSON with qemu-img's field names.
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
    /// Show an image's format, sizes, backing file and allocation.
    Info {
        /// The image.
        image: PathBuf,
        /// Image format (probed by magic when absent).
        #[arg(short = 'f', long = "format", value_name = "FMT")]
        format: Option<String>,
        /// Output style.
        #[arg(long, value_enum, default_value_t)]
        output: OutputFormat,
        #[command(flatten)]
        trust: TrustArgs,
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
    },
    /// Check an image's metadata. Exit 0 clean, 2 corruption, 3 leaked clusters only, 1 error, 63 no checks for
    /// this format.
    Check {
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
    },
    /// Convert an image to another format. DST '-' writes to standard output.
    Convert(ConvertArgs),
}

/// `imgshift convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source image.
    pub src: PathBuf,
    /// Destination file, or '-' for standard output.
    pub dst: String,
    /// Output format: raw, qcow2, vpc (vhd), vhdx, vmdk, vdi.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Source format (probed when absent).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output options, qemu-img style: key=value[,key=value...]. Repeatable.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Compress the output (qcow2; same as -o compress=on).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// Show a progress bar even when standard error is not a terminal.
    #[arg(short = 'p', long)]
    pub progress: bool,
    /// Parallel read/compress workers (default: number of CPUs, at least 4).
    #[arg(short = 'm', long = "threads", value_name = "N")]
    pub threads: Option<usize>,
    /// Print conversion statistics as JSON on standard error when done.
    #[arg(long)]
    pub stats: bool,
    #[command(flatten)]
    pub trust: TrustArgs,
}
