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
