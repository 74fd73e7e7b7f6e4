//! Storage volumes as sources (`libvirt:POOL/VOLUME`): the volume's format from its XML (`<target><format>`), its
//! bytes read over download streams (holes come as holes) under imgshift's own reader of that format. Nothing is
//! copied locally.

use quick_xml::Reader;
use quick_xml::events::Event;

use imgshift_converters::DiskSource;

use super::{Error, VolFormat, conn as lv, download};

/// The format a volume's XML names in `<target><format type='…'/>` (`None` without one).
pub fn volume_format(xml: &str) -> super::Result<Option<String>> {
    let mut r = Reader::from_str(xml);
    let mut depth_target = false;
    loop {
        match r.read_event().map_err(|e| Error::Xml(e.to_string()))? {
            Event::Start(e) if e.name().as_ref() == b"target" => depth_target = true,
            Event::End(e) if e.name().as_ref() == b"target" => depth_target = false,
            Event::Start(e) | Event::Empty(e) if depth_target && e.name().as_ref() == b"format" => {
                return Ok(e
                    .attributes()
                    .flatten()
                    .find(|a| a.key.as_ref() == b"type")
                    .and_then(|a| a.normalized_value(quick_xml::XmlVersion::Implicit1_0).ok())
                    .map(|v| v.into_owned()));
            }
            Event::Eof => return Ok(None),
            _ => {}
        }
    }
}

/// Opens volume `volume` of running pool `pool` on the daemon at `uri` as a disk source.
pub fn open_volume(uri: &str, pool: &str, volume: &str) -> anyhow::Result<Box<dyn DiskSource>> {
    let conn = lv::connect(uri)?;
    let p = lv::running_pool(&conn, pool, uri)?;
    let Some(vol) = lv::find_volume(&p, pool, volume)? else {
        anyhow::bail!("no volume '{volume}' in pool '{pool}'");
    };
    let xml = vol
        .xml_desc()
        .map_err(|e| Error::call(format!("cannot read volume '{volume}'"), &e))?;
    let format = match volume_format(&xml)?.as_deref() {
        Some("qcow2") => VolFormat::Qcow2,
        Some("raw") | None => VolFormat::Raw,
        Some(other) => anyhow::bail!(
            "volume '{volume}' is in {other} format; imgshift reads libvirt volumes in raw or qcow2"
        ),
    };
    download::open(&vol, volume, format)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn format_from_the_target_not_a_backing_store() {
        let xml = "<volume type='file'><name>v</name><capacity>1</capacity><backingStore><format type='raw'/>\
                   </backingStore><target><path>/p/v</path><format type='qcow2'/></target></volume>";
        assert_eq!(volume_format(xml).unwrap().as_deref(), Some("qcow2"));
        assert_eq!(
            volume_format("<volume><target><path>/p</path></target></volume>").unwrap(),
            None
        );
    }
}
