//! The host's capabilities (`virConnectGetCapabilities`, <https://libvirt.org/formatcaps.html>): whether KVM
//! is offered for x86_64 guests, which decides `--domain-type auto`.

use quick_xml::events::{BytesStart, Event};
use quick_xml::{Reader, XmlVersion};

use super::rpc::Connect;
use super::{DomainType, Error, Result};

/// The domain type `--domain-type auto` picks: `kvm` when the host offers KVM for x86_64 guests, else `qemu`
/// (TCG). libvirt offers KVM whenever `/dev/kvm` is usable by it; it cannot tell whether guests then run well
/// (nested or paravirtualised KVM sometimes does not), which is why `--domain-type qemu` exists.
pub fn auto_domain_type(conn: &Connect) -> Result<DomainType> {
    let xml = conn
        .capabilities()
        .map_err(|e| Error::call("cannot read the host's capabilities", &e))?;
    Ok(if offers_kvm(&xml)? {
        DomainType::Kvm
    } else {
        DomainType::Qemu
    })
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .and_then(|a| a.normalized_value(XmlVersion::Implicit1_0).ok())
        .map(|v| v.into_owned())
}

/// True when a `<guest><arch name='x86_64'>` of the capabilities lists `<domain type='kvm'/>`.
pub fn offers_kvm(caps: &str) -> Result<bool> {
    let mut r = Reader::from_str(caps);
    let mut arch: Option<String> = None;
    loop {
        match r.read_event().map_err(|e| Error::Xml(e.to_string()))? {
            Event::Start(e) | Event::Empty(e) if e.name().as_ref() == b"arch" => {
                arch = attr(&e, b"name");
            }
            Event::Start(e) | Event::Empty(e)
                if e.name().as_ref() == b"domain"
                    && arch.as_deref() == Some("x86_64")
                    && attr(&e, b"type").as_deref() == Some("kvm") =>
            {
                return Ok(true);
            }
            Event::End(e) if e.name().as_ref() == b"arch" => arch = None,
            Event::Eof => return Ok(false),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn kvm_only_for_x86_64() {
        let with = "<capabilities><host/><guest><os_type>hvm</os_type><arch name='i686'><domain type='qemu'/>\
                    </arch></guest><guest><os_type>hvm</os_type><arch name='x86_64'><wordsize>64</wordsize>\
                    <domain type='qemu'/><domain type='kvm'/></arch></guest></capabilities>";
        assert!(offers_kvm(with).unwrap());
        let without = "<capabilities><guest><arch name='x86_64'><domain type='qemu'/></arch></guest>\
                       <guest><arch name='i686'><domain type='kvm'/></arch></guest></capabilities>";
        assert!(!offers_kvm(without).unwrap());
        assert!(!offers_kvm("<capabilities><guest>").unwrap_or(false));
    }
}
