//! libvirt target: a storage volume filled through `virStorageVolUpload` streams, and a domain definition.
//!
//! The converter engine writes its output into [`VolumeSink`], which sends it in order over a libvirt Stream.
//! The `virt` crate (0.5) has no binding for sparse streams (`virStreamSendHole`), so holes are kept another
//! way: the volume is freshly created (a sparse file in a dir pool, zeros everywhere), and when the output skips
//! at least [`HOLE_MIN`] bytes (raw output only) the sink finishes the stream and opens a new one at the next
//! data offset. Shorter gaps are sent as zeros.

use std::io::Cursor;

use anyhow::{Context, Result, anyhow, bail};
use imgshift_converters::{Error as ConvError, Sink};
use quick_xml::Writer;
use quick_xml::events::{BytesEnd, BytesStart, BytesText, Event};
use virt::connect::Connect;
use virt::storage_pool::StoragePool;
use virt::storage_vol::StorageVol;
use virt::stream::Stream;

/// A gap at least this long in raw output starts a new stream instead of being sent as zeros.
pub const HOLE_MIN: u64 = 1 << 20;
/// Largest piece handed to `virStreamSend` at once (the RPC layer splits bigger ones anyway).
const SEND_CHUNK: usize = 256 * 1024;
/// `VIR_STORAGE_VOL_GET_PHYSICAL`: `info_flags` reports the file's length instead of its allocation.
const VOL_GET_PHYSICAL: u32 = 1;
/// `VIR_DOMAIN_UNDEFINE_NVRAM`.
pub const UNDEFINE_NVRAM: u32 = 4;

/// The message of a libvirt error, without the crate's `[code=…]` suffix.
pub fn msg(e: &virt::error::Error) -> String {
    e.message().trim().replace('\n', " ")
}

/// Opens a connection; an unreachable daemon gives one line saying how to start or point at one.
pub fn connect(uri: &str) -> Result<Connect> {
    // libvirt's default error handler prints every failed call (lookups included) on stderr.
    virt::error::clear_error_callback();
    Connect::open(Some(uri)).map_err(|e| {
        anyhow!(
            "cannot connect to libvirt at '{uri}': {}; start libvirtd (`systemctl start libvirtd`, or `bash \
             .ci/standins start` in this repository) or point --connect at a running daemon, e.g. \
             'qemu:///system?socket=/path/to/libvirt-sock'",
            msg(&e)
        )
    })
}

/// Looks up a pool that must exist and be running.
pub fn pool(conn: &Connect, name: &str, uri: &str) -> Result<StoragePool> {
    let p = conn.lookup_storage_pool_by_name(name).map_err(|e| {
        anyhow!(
            "storage pool '{name}' not found at {uri} ({}); list pools with `virsh -c '{uri}' pool-list --all`",
            msg(&e)
        )
    })?;
    if !p.is_active().map_err(|e| anyhow!("pool '{name}': {}", msg(&e)))? {
        bail!("storage pool '{name}' is not running; start it with `virsh -c '{uri}' pool-start {name}`");
    }
    Ok(p)
}

/// Volume definition: a `name` volume of `capacity` bytes in `format` (raw or qcow2), allocated lazily.
pub fn volume_xml(name: &str, capacity: u64, format: &str) -> Result<String> {
    let mut w = Writer::new(Cursor::new(Vec::new()));
    open(&mut w, "volume", &[])?;
    text(&mut w, "name", &[], name)?;
    text(&mut w, "capacity", &[("unit", "bytes")], &capacity.to_string())?;
    text(&mut w, "allocation", &[("unit", "bytes")], "0")?;
    open(&mut w, "target", &[])?;
    empty(&mut w, "format", &[("type", format)])?;
    close(&mut w, "target")?;
    close(&mut w, "volume")?;
    finish(w)
}

/// What `--define` puts into the domain.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// Domain name.
    pub name: String,
    /// `qemu` (TCG) or `kvm`.
    pub domain_type: String,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// UEFI firmware (else BIOS).
    pub uefi: bool,
    /// `virtio`, `sata` or `scsi`.
    pub disk_bus: String,
    /// The volume's pool and name, and its format.
    pub pool: String,
    /// Volume name.
    pub volume: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// A libvirt network to attach a virtio NIC to.
    pub network: Option<String>,
}

/// Domain XML for `spec`, written with an XML writer (names are escaped, never spliced into markup).
pub fn domain_xml(spec: &DomainSpec) -> Result<String> {
    let dev = match spec.disk_bus.as_str() {
        "virtio" => "vda",
        "sata" | "scsi" => "sda",
        other => bail!("unknown disk bus '{other}'"),
    };
    let mut w = Writer::new_with_indent(Cursor::new(Vec::new()), b' ', 2);
    open(&mut w, "domain", &[("type", &spec.domain_type)])?;
    text(&mut w, "name", &[], &spec.name)?;
    text(
        &mut w,
        "memory",
        &[("unit", "MiB")],
        &spec.memory_mib.to_string(),
    )?;
    text(&mut w, "vcpu", &[], &spec.vcpus.to_string())?;
    let os_attrs: &[(&str, &str)] = if spec.uefi {
        &[("firmware", "efi")]
    } else {
        &[]
    };
    open(&mut w, "os", os_attrs)?;
    text(
        &mut w,
        "type",
        &[("arch", "x86_64"), ("machine", "q35")],
        "hvm",
    )?;
    empty(&mut w, "boot", &[("dev", "hd")])?;
    close(&mut w, "os")?;
    // libvirt 9 passes -no-acpi (gone in QEMU 10) unless ACPI is asked for explicitly.
    open(&mut w, "features", &[])?;
    empty(&mut w, "acpi", &[])?;
    empty(&mut w, "apic", &[])?;
    close(&mut w, "features")?;
    open(&mut w, "devices", &[])?;
    open(&mut w, "disk", &[("type", "volume"), ("device", "disk")])?;
    empty(&mut w, "driver", &[("name", "qemu"), ("type", &spec.format)])?;
    empty(
        &mut w,
        "source",
        &[("pool", &spec.pool), ("volume", &spec.volume)],
    )?;
    empty(&mut w, "target", &[("dev", dev), ("bus", &spec.disk_bus)])?;
    close(&mut w, "disk")?;
    if spec.disk_bus == "scsi" {
        empty(
            &mut w,
            "controller",
            &[("type", "scsi"), ("model", "virtio-scsi")],
        )?;
    }
    if let Some(net) = &spec.network {
        open(&mut w, "interface", &[("type", "network")])?;
        empty(&mut w, "source", &[("network", net)])?;
        empty(&mut w, "model", &[("type", "virtio")])?;
        close(&mut w, "interface")?;
    }
    open(&mut w, "serial", &[("type", "pty")])?;
    empty(&mut w, "target", &[("port", "0")])?;
    close(&mut w, "serial")?;
    open(&mut w, "console", &[("type", "pty")])?;
    empty(&mut w, "target", &[("type", "serial"), ("port", "0")])?;
    close(&mut w, "console")?;
    close(&mut w, "devices")?;
    close(&mut w, "domain")?;
    finish(w)
}

type Xw = Writer<Cursor<Vec<u8>>>;

fn start<'a>(name: &'a str, attrs: &[(&str, &str)]) -> BytesStart<'a> {
    let mut e = BytesStart::new(name);
    for (k, v) in attrs {
        e.push_attribute((*k, *v));
    }
    e
}

fn open(w: &mut Xw, name: &str, attrs: &[(&str, &str)]) -> Result<()> {
    w.write_event(Event::Start(start(name, attrs)))
        .context("cannot write XML")
}

fn close(w: &mut Xw, name: &str) -> Result<()> {
    w.write_event(Event::End(BytesEnd::new(name)))
        .context("cannot write XML")
}

fn empty(w: &mut Xw, name: &str, attrs: &[(&str, &str)]) -> Result<()> {
    w.write_event(Event::Empty(start(name, attrs)))
        .context("cannot write XML")
}

fn text(w: &mut Xw, name: &str, attrs: &[(&str, &str)], body: &str) -> Result<()> {
    open(w, name, attrs)?;
    w.write_event(Event::Text(BytesText::new(body)))
        .context("cannot write XML")?;
    close(w, name)
}

fn finish(w: Xw) -> Result<String> {
    String::from_utf8(w.into_inner().into_inner()).context("XML is not UTF-8")
}

/// The physical length of a volume's file (bytes).
pub fn physical_len(vol: &StorageVol) -> Result<u64> {
    vol.info_flags(VOL_GET_PHYSICAL)
        .map(|i| i.allocation)
        .map_err(|e| anyhow!("cannot read the volume's size: {}", msg(&e)))
}

/// What a [`VolumeSink`] sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct SentCounts {
    /// Bytes sent over streams (data and zero fill).
    pub bytes_sent: u64,
    /// Zero bytes sent to fill short gaps.
    pub zero_fill: u64,
    /// Streams opened (one per skipped hole, plus one).
    pub streams: u64,
}

/// Feeds a writer's output, in increasing offsets, into a freshly created volume over libvirt Streams.
pub struct VolumeSink {
    conn: Connect,
    vol: StorageVol,
    stream: Option<Stream>,
    pos: u64,
    /// Gaps this long start a new stream (`u64::MAX`: never; gaps are then all sent as zeros).
    hole_min: u64,
    /// `finish` sends zeros up to at least this length (to cover the metadata libvirt wrote at creation).
    min_len: u64,
    /// What was sent.
    pub sent: SentCounts,
}

fn lv_err(what: &str, e: &virt::error::Error) -> ConvError {
    ConvError::input(format!("{what}: {}", msg(e)))
}

impl VolumeSink {
    /// A sink writing `vol` from offset 0. `skip_holes` (raw output into a fresh, sparse volume) lets long gaps
    /// stay holes; `min_len` is the volume file's length before the upload.
    pub fn new(conn: &Connect, vol: &StorageVol, skip_holes: bool, min_len: u64) -> VolumeSink {
        VolumeSink {
            conn: conn.clone(),
            vol: vol.clone(),
            stream: None,
            pos: 0,
            hole_min: if skip_holes { HOLE_MIN } else { u64::MAX },
            min_len,
            sent: SentCounts::default(),
        }
    }

    fn stream_at(&mut self, offset: u64) -> imgshift_converters::Result<&Stream> {
        if self.stream.is_none() {
            let s = Stream::new(&self.conn, 0).map_err(|e| lv_err("cannot open a stream", &e))?;
            self.vol
                .upload(&s, offset, 0, 0)
                .map_err(|e| lv_err(&format!("cannot start the upload at offset {offset}"), &e))?;
            self.sent.streams += 1;
            self.stream = Some(s);
        }
        self.stream
            .as_ref()
            .ok_or_else(|| ConvError::input("internal error: no stream"))
    }

    fn send(&mut self, data: &[u8]) -> imgshift_converters::Result<()> {
        let at = self.pos;
        let s = self.stream_at(at)?;
        let mut rest = data;
        while !rest.is_empty() {
            let n = rest.len().min(SEND_CHUNK);
            let (piece, tail) = rest.split_at(n);
            let mut off = 0;
            while off < piece.len() {
                let sent = s
                    .send(piece.get(off..).unwrap_or_default())
                    .map_err(|e| lv_err("cannot send to the volume", &e))?;
                let sent = usize::try_from(sent).unwrap_or(0);
                if sent == 0 {
                    return Err(ConvError::input("the libvirt stream accepted no data"));
                }
                off += sent;
            }
            rest = tail;
        }
        self.pos += data.len() as u64;
        self.sent.bytes_sent += data.len() as u64;
        Ok(())
    }

    fn zeros(&mut self, mut n: u64) -> imgshift_converters::Result<()> {
        static ZERO: [u8; 64 * 1024] = [0; 64 * 1024];
        self.sent.zero_fill += n;
        while n > 0 {
            let k = n.min(ZERO.len() as u64);
            self.send(ZERO.get(..k as usize).unwrap_or_default())?;
            n -= k;
        }
        Ok(())
    }

    fn end_stream(&mut self) -> imgshift_converters::Result<()> {
        if let Some(s) = self.stream.take() {
            s.finish()
                .map_err(|e| lv_err("the volume upload failed", &e))?;
        }
        Ok(())
    }

    /// Aborts the stream in progress (after a failure).
    pub fn abort(&mut self) {
        if let Some(s) = self.stream.take() {
            let _ = s.abort();
        }
    }
}

impl Sink for VolumeSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> imgshift_converters::Result<()> {
        if offset < self.pos {
            return Err(ConvError::input(format!(
                "internal error: volume stream went back from {} to {offset}",
                self.pos
            )));
        }
        let gap = offset - self.pos;
        if gap >= self.hole_min {
            self.end_stream()?;
            self.pos = offset;
        } else {
            self.zeros(gap)?;
        }
        self.send(data)
    }

    fn can_seek_back(&self) -> bool {
        false
    }

    fn finish(&mut self, len: u64) -> imgshift_converters::Result<()> {
        // Raw: the fresh volume already is `len` bytes of zeros. Qcow2: zero whatever libvirt's own header
        // left beyond our end, so no stale metadata follows the image.
        let want = if self.hole_min == u64::MAX {
            len.max(self.min_len)
        } else {
            self.pos
        };
        if want > self.pos {
            self.zeros(want - self.pos)?;
        }
        if self.sent.streams == 0 {
            // An empty raw disk: nothing to send, the volume is already all zeros.
            return Ok(());
        }
        self.end_stream()
    }
}

impl Drop for VolumeSink {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Deletes a volume created by this run; on failure the error names it so the user can remove it.
pub fn delete_volume(vol: &StorageVol, pool: &str, name: &str) -> Result<()> {
    vol.delete(0).map_err(|e| {
        anyhow!(
            "volume '{name}' in pool '{pool}' could not be deleted ({}): remove it with `virsh vol-delete --pool \
             {pool} {name}`",
            msg(&e)
        )
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names_are_escaped_in_xml() {
        let spec = DomainSpec {
            name: "a<b>&'\"".into(),
            domain_type: "qemu".into(),
            memory_mib: 512,
            vcpus: 2,
            uefi: true,
            disk_bus: "scsi".into(),
            pool: "p'".into(),
            volume: "v\"".into(),
            format: "qcow2".into(),
            network: Some("n&".into()),
        };
        let x = domain_xml(&spec).unwrap();
        assert!(x.contains("<name>a&lt;b&gt;&amp;&apos;&quot;</name>"), "{x}");
        assert!(x.contains("pool=\"p&apos;\""), "{x}");
        assert!(x.contains("volume=\"v&quot;\""), "{x}");
        assert!(x.contains("<os firmware=\"efi\">"), "{x}");
        assert!(x.contains("virtio-scsi"), "{x}");
        let v = volume_xml("x&y", 1234, "raw").unwrap();
        assert_eq!(
            v,
            "<volume><name>x&amp;y</name><capacity unit=\"bytes\">1234</capacity><allocation \
             unit=\"bytes\">0</allocation><target><format type=\"raw\"/></target></volume>"
        );
    }
}
