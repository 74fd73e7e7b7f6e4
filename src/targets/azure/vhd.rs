//! The byte stream a managed disk upload expects: the source as a *fixed* VHD whose data part is a whole number
//! of MiB (at least 20 MiB), followed by the 512-byte footer. This is the converters' VHD writer with
//! `subformat=fixed,round_to_mib=on`, padded up to Azure's minimum.

use imgshift_converters::{FormatWriter, Plan, Run, Sink, WriterOptions, create_writer};

use super::MIN_DISK;

/// A fixed-VHD writer sized for Azure.
pub struct AzureVhdWriter {
    inner: Box<dyn FormatWriter>,
}

impl AzureVhdWriter {
    /// The converters' VHD writer with `subformat=fixed,round_to_mib=on`.
    pub fn new() -> imgshift_converters::Result<Self> {
        let mut opts = WriterOptions::default();
        opts.set("subformat", "fixed");
        opts.set("round_to_mib", "on");
        let inner = create_writer(imgshift_converters::Format::Vpc, &mut opts)?;
        Ok(AzureVhdWriter { inner })
    }
}

impl FormatWriter for AzureVhdWriter {
    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }

    fn output_virtual_size(&self, source_size: u64) -> imgshift_converters::Result<u64> {
        let v = self.inner.output_virtual_size(source_size)?;
        if v < MIN_DISK {
            // Sizes the inner writer for the padded disk (it remembers the last sizing).
            return self.inner.output_virtual_size(MIN_DISK);
        }
        Ok(v)
    }

    fn begin(&mut self, sink: &mut dyn Sink, plan: &Plan<'_>) -> imgshift_converters::Result<()> {
        self.inner.begin(sink, plan)
    }

    fn write_run(
        &mut self,
        sink: &mut dyn Sink,
        offset: u64,
        run: Run<'_>,
    ) -> imgshift_converters::Result<()> {
        self.inner.write_run(sink, offset, run)
    }

    fn finish(&mut self, sink: &mut dyn Sink) -> imgshift_converters::Result<u64> {
        self.inner.finish(sink)
    }
}

/// Checks the 512-byte footer of a fixed VHD whose data part is `data_size` bytes: the VHD format module's rule
/// ([`imgshift_converters::formats::vhd::meta::check_fixed_footer`]: cookie, checksum, version, disk type 2, no
/// data offset, current size = `data_size`).
pub fn check_fixed_footer(footer: &[u8], data_size: u64) -> anyhow::Result<()> {
    imgshift_converters::formats::vhd::meta::check_fixed_footer(footer, data_size)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgshift_converters::{ConvertOptions, NoProgress, engine};

    /// The footer the writer makes for a 20 MiB disk.
    fn footer() -> Vec<u8> {
        let raw = vec![1u8; 1 << 20];
        let storage = std::sync::Arc::new(imgshift_converters::MemStorage::new(raw, "mem"));
        let src = imgshift_converters::open(
            storage,
            Some(imgshift_converters::Format::Raw),
            &imgshift_converters::OpenGate::new(),
        )
        .unwrap();
        let mut w = AzureVhdWriter::new().unwrap();
        let mut out = imgshift_converters::MemSink::default();
        engine::convert(
            src.as_ref(),
            &mut w,
            &mut out,
            &ConvertOptions::default(),
            &NoProgress,
        )
        .unwrap();
        out.data[MIN_DISK as usize..].to_vec()
    }

    fn resum(f: &mut [u8]) {
        f[64..68].fill(0);
        let s = f.iter().fold(0u32, |a, &b| a.wrapping_add(u32::from(b)));
        f[64..68].copy_from_slice(&(!s).to_be_bytes());
    }

    #[test]
    fn the_writers_footer_passes() {
        check_fixed_footer(&footer(), MIN_DISK).unwrap();
    }

    #[test]
    fn rejects_bad_footers() {
        let good = footer();
        let e = |f: &[u8], size: u64| check_fixed_footer(f, size).unwrap_err().to_string();
        assert!(e(&good, MIN_DISK + (1 << 20)).contains("current size"));
        assert!(e(&good[..511], MIN_DISK).contains("512 bytes, not 511"));
        let mut f = good.clone();
        f[0] = b'x';
        assert!(e(&f, MIN_DISK).contains("cookie"));
        let mut f = good.clone();
        f[100] ^= 1;
        assert!(e(&f, MIN_DISK).contains("checksum"));
        let mut f = good.clone();
        f[63] = 3;
        resum(&mut f);
        assert!(e(&f, MIN_DISK).contains("disk type 3 (dynamic), not 2"));
        let mut f = good;
        f[16..24].fill(0);
        resum(&mut f);
        assert!(e(&f, MIN_DISK).contains("data offset"));
    }
}
