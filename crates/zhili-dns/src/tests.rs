use super::*;
use hickory_proto::op::Message;

/// A fixed catalog: the unit under test is the DNS side; the registry side is exercised by the
/// integration test with `dig` against the real binary.
struct Fixed(Vec<(String, Vec<String>, Endpoint)>);

impl Catalog for Fixed {
    fn service(&self, name: &str, tag: Option<&str>) -> Option<Vec<Endpoint>> {
        let of: Vec<_> = self.0.iter().filter(|(s, _, _)| s == name).collect();
        if of.is_empty() {
            return None;
        }
        Some(of.into_iter().filter(|(_, tags, _)| tag.is_none_or(|t| tags.iter().any(|x| x == t))).map(|(_, _, e)| e.clone()).collect())
    }
    fn node(&self, name: &str) -> Option<String> {
        (name == "zhili").then(|| "127.0.0.1".to_string())
    }
}

fn server(n: usize) -> Arc<DnsServer> {
    let eps = (0..n)
        .map(|i| {
            (
                "web".to_string(),
                vec![if i % 2 == 0 { "v1" } else { "v2" }.to_string()],
                Endpoint { node: "zhili".into(), address: format!("10.0.{}.{}", i / 250, i % 250 + 1), port: 8000 + i as u16 },
            )
        })
        .chain(std::iter::once(("v6".to_string(), vec![], Endpoint { node: "zhili".into(), address: "::1".into(), port: 1 })))
        .chain(std::iter::once(("empty".to_string(), vec!["x".to_string()], Endpoint { node: "zhili".into(), address: "10.9.9.9".into(), port: 1 })))
        .collect();
    DnsServer::new(Arc::new(Fixed(eps)), "dc1", Duration::from_secs(5))
}

fn ask(s: &DnsServer, name: &str, qtype: RecordType, udp: bool, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    Message::from_vec(&s.answer(&m.to_vec().unwrap(), udp).expect("an answer")).unwrap()
}

#[test]
fn a_srv_tags_and_datacenters() {
    let s = server(4);
    let r = ask(&s, "web.service.consul.", RecordType::A, true, None);
    assert_eq!(r.metadata.response_code, ResponseCode::NoError);
    assert!(r.metadata.authoritative);
    assert_eq!(r.answers.len(), 4);
    assert!(r.answers.iter().all(|a| a.ttl == 5));
    let r = ask(&s, "v1.web.service.dc1.zhili.", RecordType::A, true, None);
    assert_eq!(r.answers.len(), 2, "tag filter under .zhili with the datacenter");
    let r = ask(&s, "_web._v2.service.consul.", RecordType::SRV, true, None);
    assert_eq!(r.answers.len(), 2, "RFC 2782 form with a tag");
    let srv: Vec<u16> = r.answers.iter().filter_map(|a| if let RData::SRV(s) = &a.data { Some(s.port) } else { None }).collect();
    assert!(srv.iter().all(|p| [8001, 8003].contains(p)), "{srv:?}");
    assert_eq!(r.additionals.len(), 2, "targets resolve in the additional section");
    assert_eq!(ask(&s, "_web._tcp.service.consul.", RecordType::SRV, true, None).answers.len(), 4, "_tcp means any tag");
    let r = ask(&s, "v6.service.consul.", RecordType::AAAA, true, None);
    assert!(matches!(r.answers[0].data, RData::AAAA(_)));
    assert!(ask(&s, "v6.service.consul.", RecordType::A, true, None).answers.is_empty());
    let r = ask(&s, "zhili.node.consul.", RecordType::A, true, None);
    assert_eq!(r.answers.len(), 1);
    let r = ask(&s, "0a000001.addr.dc1.consul.", RecordType::A, true, None);
    assert!(matches!(r.answers[0].data, RData::A(A(ip)) if ip.to_string() == "10.0.0.1"));
}

#[test]
fn unknown_names_get_nxdomain_with_soa() {
    let s = server(1);
    for name in ["nope.service.consul.", "web.service.dc9.consul.", "x.node.consul.", "what.consul."] {
        let r = ask(&s, name, RecordType::A, true, None);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(matches!(r.authorities[0].data, RData::SOA(_)), "{name}");
    }
    // A known service with nothing serving (for this tag) is NOERROR with no data.
    let r = ask(&s, "y.empty.service.consul.", RecordType::A, true, None);
    assert_eq!((r.metadata.response_code, r.answers.len()), (ResponseCode::NoError, 0));
    assert_eq!(ask(&s, "example.com.", RecordType::A, true, None).metadata.response_code, ResponseCode::Refused);
}

#[test]
fn big_answers_truncate_over_udp_but_not_tcp() {
    let s = server(100);
    let udp = ask(&s, "web.service.consul.", RecordType::A, true, None);
    assert!(udp.metadata.truncation);
    assert!(!udp.answers.is_empty() && udp.answers.len() < 100);
    let bigger = ask(&s, "web.service.consul.", RecordType::A, true, Some(4096));
    assert!(!bigger.metadata.truncation, "EDNS0 raises the limit");
    let tcp = ask(&s, "web.service.consul.", RecordType::A, false, None);
    assert!(!tcp.metadata.truncation);
    assert_eq!(tcp.answers.len(), 100);
}

#[test]
fn malformed_packets_are_dropped() {
    let s = server(1);
    assert!(s.answer(&[], true).is_none());
    assert!(s.answer(&[0xff; 7], true).is_none());
    let mut garbage = vec![0u8; 12];
    garbage[5] = 200; // claims 200 questions
    assert!(s.answer(&garbage, true).is_none());
    for seed in 0..2000u32 {
        let len = (seed % 97) as usize;
        let bytes: Vec<u8> = (0..len).map(|i| (seed.wrapping_mul(2654435761).wrapping_add(i as u32 * 40503) >> 7) as u8).collect();
        let _ = s.answer(&bytes, true);
    }
}

#[test]
fn hex_addresses_round_trip() {
    for ip in ["10.1.2.3", "::1", "fe80::1"] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(parse_hex_ip(&hex_ip(ip)), Some(ip));
    }
    assert_eq!(parse_hex_ip("zz"), None);
    assert_eq!(parse_hex_ip("0a0000"), None);
}

proptest::proptest! {
    /// Any bytes, and any one-byte corruption of a real query, get an answer or silence, never a
    /// panic; an answer is always a parseable DNS message.
    #[test]
    fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600), udp in proptest::bool::ANY) {
        if let Some(out) = server(3).answer(&bytes, udp) {
            proptest::prop_assert!(Message::from_vec(&out).is_ok());
        }
    }

    #[test]
    fn corrupted_questions_never_panic(name in "[a-z0-9._-]{0,80}", at in 0usize..128, byte in proptest::num::u8::ANY, qtype in 0u16..300) {
        let mut m = Message::query();
        if let Ok(n) = Name::from_ascii(&name) {
            m.add_query(Query::query(n, RecordType::from(qtype)));
        }
        let mut bytes = m.to_vec().unwrap_or_default();
        if let Some(b) = bytes.get_mut(at) {
            *b = byte;
        }
        for udp in [true, false] {
            if let Some(out) = server(3).answer(&bytes, udp) {
                proptest::prop_assert!(Message::from_vec(&out).is_ok());
            }
        }
    }
}
