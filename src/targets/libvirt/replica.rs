//! Recovery points as volumes of a libvirt storage pool (`replicate --to libvirt --pool POOL`): `NAME.N.qcow2` is
//! a qcow2 layer whose backing file is point N-1's volume (by its path on the daemon's host), written over one
//! sparse upload stream like any volume. The state lives in the pool too: `NAME.replica-a.json` and
//! `NAME.replica-b.json` are two slots written in turn (each a generation number and the points), so a run
//! killed while one is rewritten leaves the other; `NAME.N.sha256` volumes hold the points' block hashes.
//!
//! Small volumes (state, hashes) hold an 8-byte big-endian length, the bytes, then zeros.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use imgshift_converters::engine::convert_with_map;
use imgshift_converters::{ConvertOptions, Format, WriterOptions};
use serde::{Deserialize, Serialize};

use super::rpc::stream::Chunk;
use super::rpc::{Connect, StoragePool, StorageVol};
use super::sink::VolumeSink;
use super::{VolFormat, conn as lv, fill, msg, volume};
use crate::replica::{Point, PointInput, ReplicaStore};

/// Largest state or hash volume read.
const MAX_SMALL: u64 = 1 << 30;
/// Version of the state's layout.
const STATE_VERSION: u32 = 1;

/// The state kept in the pool.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    version: u32,
    name: String,
    generation: u64,
    points: Vec<Point>,
}

/// A storage pool holding a replica's points.
pub struct LibvirtStore {
    uri: String,
    pool_name: String,
    conn: Connect,
    pool: StoragePool,
    stop: Arc<AtomicBool>,
}

impl LibvirtStore {
    /// Points in pool `pool` at `uri` (which must exist and run).
    pub fn new(uri: &str, pool: &str, stop: Arc<AtomicBool>) -> Result<LibvirtStore> {
        let conn = lv::connect(uri)?;
        let p = lv::running_pool(&conn, pool, uri)?;
        Ok(LibvirtStore {
            uri: uri.to_string(),
            pool_name: pool.to_string(),
            conn,
            pool: p,
            stop,
        })
    }

    /// The volume of point `n` of replica `name`.
    pub fn point_volume(name: &str, n: u32) -> String {
        format!("{name}.{n}.qcow2")
    }

    fn find(&self, name: &str) -> Result<Option<StorageVol>> {
        Ok(lv::find_volume(&self.pool, &self.pool_name, name)?)
    }

    fn delete_if_present(&self, name: &str) -> Result<()> {
        if let Some(v) = self.find(name)? {
            volume::delete(&v, &self.pool_name, name)?;
        }
        Ok(())
    }

    /// Writes `body` as the small volume `name` (replacing one of that name).
    fn write_small(&self, name: &str, body: &[u8]) -> Result<()> {
        self.delete_if_present(name)?;
        let mut framed = Vec::with_capacity(body.len() + 8);
        framed.extend_from_slice(&(body.len() as u64).to_be_bytes());
        framed.extend_from_slice(body);
        let c = volume::create(
            &self.pool,
            &self.pool_name,
            name,
            framed.len() as u64,
            VolFormat::Raw,
        )?;
        let mut up = c
            .vol
            .upload(0, framed.len() as u64, 0)
            .map_err(|e| anyhow::anyhow!("cannot write volume '{name}': {}", msg(&e)))?;
        up.send(&framed)
            .and_then(|()| up.finish())
            .map_err(|e| anyhow::anyhow!("cannot write volume '{name}': {}", msg(&e)))?;
        Ok(())
    }

    /// The bytes of the small volume `name`, `None` when there is none.
    fn read_small(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let Some(vol) = self.find(name)? else {
            return Ok(None);
        };
        let mut dl = vol
            .download(0, 0, 0)
            .map_err(|e| anyhow::anyhow!("cannot read volume '{name}': {}", msg(&e)))?;
        let mut buf: Vec<u8> = Vec::new();
        let mut want: Option<u64> = None;
        loop {
            match dl
                .next_chunk()
                .map_err(|e| anyhow::anyhow!("cannot read volume '{name}': {}", msg(&e)))?
            {
                Chunk::Data(d) => buf.extend_from_slice(&d),
                Chunk::Hole(n) => {
                    let n = usize::try_from(n).ok().filter(|n| *n as u64 <= MAX_SMALL);
                    let Some(n) = n else {
                        bail!("volume '{name}' is too large")
                    };
                    buf.resize(buf.len().saturating_add(n), 0);
                }
                Chunk::End => break,
            }
            if want.is_none()
                && let Some(h) = buf.get(..8)
            {
                let n = u64::from_be_bytes(h.try_into().context("length")?);
                if n > MAX_SMALL {
                    bail!("volume '{name}' declares {n} bytes");
                }
                want = Some(n + 8);
            }
            if let Some(w) = want
                && buf.len() as u64 >= w
            {
                dl.abort();
                buf.truncate(w as usize);
                return Ok(Some(buf.split_off(8)));
            }
            if buf.len() as u64 > MAX_SMALL + 8 {
                bail!("volume '{name}' is too large");
            }
        }
        let _ = dl.finish();
        match want {
            Some(w) if buf.len() as u64 >= w => {
                buf.truncate(w as usize);
                Ok(Some(buf.split_off(8)))
            }
            _ => bail!("volume '{name}' ends before the length it declares"),
        }
    }

    fn slot(name: &str, s: char) -> String {
        format!("{name}.replica-{s}.json")
    }

    /// The newest valid state, with the slot it is in.
    fn read_state(&self, name: &str) -> Result<(State, Option<char>)> {
        let mut best: Option<(State, char)> = None;
        for s in ['a', 'b'] {
            let Some(bytes) = self.read_small(&Self::slot(name, s))? else {
                continue;
            };
            let Ok(st) = serde_json::from_slice::<State>(&bytes) else {
                continue;
            };
            if st.version != STATE_VERSION {
                bail!(
                    "the state of replica {name} in pool '{}' has layout version {}; this imgshift reads {STATE_VERSION}",
                    self.pool_name,
                    st.version
                );
            }
            if st.name != name {
                continue;
            }
            if best
                .as_ref()
                .is_none_or(|(b, _)| st.generation > b.generation)
            {
                best = Some((st, s));
            }
        }
        Ok(match best {
            Some((st, s)) => (st, Some(s)),
            None => (
                State {
                    version: STATE_VERSION,
                    name: name.to_string(),
                    generation: 0,
                    points: Vec::new(),
                },
                None,
            ),
        })
    }

    /// Writes `points` as the next generation, into the slot not holding the newest.
    fn write_state(&self, name: &str, points: Vec<Point>) -> Result<()> {
        let (old, slot) = self.read_state(name)?;
        let next = if slot == Some('a') { 'b' } else { 'a' };
        let st = State {
            version: STATE_VERSION,
            name: name.to_string(),
            generation: old.generation.saturating_add(1),
            points,
        };
        self.write_small(&Self::slot(name, next), &serde_json::to_vec(&st)?)
    }

    fn hashes_volume(name: &str, n: u32) -> String {
        format!("{name}.{n}.sha256")
    }
}

/// What failover made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failover {
    /// The domain defined.
    pub domain: String,
    /// Its disk: a qcow2 overlay over the point's volume (the point itself stays as it was).
    pub volume: String,
    /// The point it runs from.
    pub point: u32,
    /// Firmware chosen.
    pub firmware: String,
    /// Disk bus chosen.
    pub disk_bus: String,
    /// Whether it was started.
    pub started: bool,
    /// Why `auto` choices came out as they did.
    pub notes: Vec<String>,
}

impl LibvirtStore {
    /// Defines domain `domain` running from point `point` of replica `name`: its disk a new qcow2 overlay
    /// `DOMAIN.qcow2` over the point's volume, so the guest's writes never touch the replica. An overlay left by
    /// an interrupted failover (no domain uses it) is replaced.
    pub fn failover(
        &self,
        point: &Point,
        domain: &str,
        choices: &super::plan::DomainChoices,
        hints: &super::plan::GuestHints,
        start: bool,
    ) -> Result<Failover> {
        if lv::find_domain(&self.conn, domain)?.is_some() {
            bail!(
                "domain '{domain}' already exists: name another with --domain, or remove it (virsh undefine {domain})"
            );
        }
        let base = self.find(&point.target_id)?.with_context(|| {
            format!(
                "the volume of point {} ('{}') is gone",
                point.number, point.target_id
            )
        })?;
        let base_path = base.path().map_err(|e| {
            anyhow::anyhow!("cannot get the path of '{}': {}", point.target_id, msg(&e))
        })?;
        let overlay = format!("{domain}.qcow2");
        self.delete_if_present(&overlay)?;
        let capacity = fill::capacity(VolFormat::Qcow2, point.virtual_size)?;
        let xml = super::xml::overlay_volume_xml(&overlay, capacity, &base_path)?;
        let vol = self.pool.create_volume_xml(&xml, 0).map_err(|e| {
            anyhow::anyhow!(
                "cannot create volume '{overlay}' in pool '{}': {}",
                self.pool_name,
                msg(&e)
            )
        })?;
        let plan = super::plan::plan_domain(
            domain,
            choices,
            vec![super::xml::DomainDisk {
                pool: self.pool_name.clone(),
                volume: overlay.clone(),
                format: VolFormat::Qcow2,
            }],
            Some(hints),
            &self.conn,
        );
        let plan = match plan {
            Ok(p) => p,
            Err(e) => {
                let _ = volume::delete(&vol, &self.pool_name, &overlay);
                return Err(e);
            }
        };
        let dxml = super::xml::domain_xml(&plan.spec)?;
        let dom = match lv::define(&self.conn, &dxml, domain) {
            Ok(d) => d,
            Err(e) => {
                let _ = volume::delete(&vol, &self.pool_name, &overlay);
                return Err(e.into());
            }
        };
        if start {
            lv::start(&dom, domain)?;
        }
        Ok(Failover {
            domain: domain.to_string(),
            volume: overlay,
            point: point.number,
            firmware: super::plan::fw_name(plan.spec.firmware).to_string(),
            disk_bus: plan.spec.disk_bus.name().to_string(),
            started: start,
            notes: plan.notes,
        })
    }
}

impl ReplicaStore for LibvirtStore {
    fn describe(&self) -> String {
        format!("pool '{}' at {}", self.pool_name, self.uri)
    }

    fn points(&mut self, name: &str) -> Result<Vec<Point>> {
        let (st, _) = self.read_state(name)?;
        for p in &st.points {
            if self.find(&p.target_id)?.is_none() {
                bail!(
                    "point {} of replica {name} (volume '{}') is missing from pool '{}'",
                    p.number,
                    p.target_id,
                    self.pool_name
                );
            }
        }
        Ok(st.points)
    }

    fn write_point(&mut self, input: PointInput<'_>) -> Result<Point> {
        let vol_name = Self::point_volume(input.name, input.point.number);
        // A volume of this number not in the state is what a killed run left: it is replaced.
        self.delete_if_present(&vol_name)?;
        let mut opts = WriterOptions::default();
        if let Some(parent) = input.parent {
            let pv = self.find(&parent.target_id)?.with_context(|| {
                format!(
                    "the volume of point {} ('{}') is gone",
                    parent.number, parent.target_id
                )
            })?;
            let path = pv.path().map_err(|e| {
                anyhow::anyhow!("cannot get the path of '{}': {}", parent.target_id, msg(&e))
            })?;
            opts.set("backing_file", path);
            opts.set("backing_fmt", "qcow2");
        }
        let mut writer = imgshift_converters::create_writer(Format::Qcow2, &mut opts)?;
        let capacity = fill::capacity(VolFormat::Qcow2, input.src.virtual_size())?;
        let created = volume::create(
            &self.pool,
            &self.pool_name,
            &vol_name,
            capacity,
            VolFormat::Qcow2,
        )?;
        let mut sink =
            VolumeSink::new(&created.vol, created.initial_len).with_cancel(self.stop.clone());
        let map = input.changes.as_map()?;
        let r = convert_with_map(
            input.src,
            &map,
            writer.as_mut(),
            &mut sink,
            &ConvertOptions::default(),
            input.progress,
        );
        let stats = match r {
            Ok(s) => s,
            Err(e) => {
                sink.abort();
                let _ = volume::delete(&created.vol, &self.pool_name, &vol_name);
                return Err(
                    anyhow::Error::new(e).context(format!("cannot write volume '{vol_name}'"))
                );
            }
        };
        crate::journal::pause_point("replicate-point-written");
        if self.stop.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        let mut point = input.point;
        point.target_id = vol_name;
        point.sent_bytes = stats.bytes_written;
        let (st, _) = self.read_state(input.name)?;
        let mut points: Vec<Point> = st
            .points
            .into_iter()
            .filter(|p| p.number < point.number)
            .collect();
        points.push(point.clone());
        self.write_state(input.name, points)?;
        Ok(point)
    }

    fn delete_oldest(&mut self, name: &str, drop: &[Point], first_kept: &Point) -> Result<()> {
        let _ = (drop, first_kept);
        bail!(
            "--keep: replica {name}'s points in pool '{}' are layers of one qcow2 chain, each needing the one \
             before it; drop old points by replicating into a new replica (or to --to file, which merges them)",
            self.pool_name
        )
    }

    fn open_point(
        &mut self,
        _name: &str,
        _p: &Point,
    ) -> Result<Option<Box<dyn imgshift_converters::DiskSource>>> {
        Ok(None)
    }

    fn load_hashes(&mut self, name: &str, p: &Point) -> Result<Option<Vec<u8>>> {
        self.read_small(&Self::hashes_volume(name, p.number))
    }

    fn save_hashes(&mut self, name: &str, p: &Point, hashes: &[u8]) -> Result<()> {
        self.write_small(&Self::hashes_volume(name, p.number), hashes)?;
        if let Some(prev) = p.number.checked_sub(1).filter(|n| *n > 0) {
            // Only the newest point's hashes are ever compared against.
            self.delete_if_present(&Self::hashes_volume(name, prev))?;
        }
        Ok(())
    }
}
