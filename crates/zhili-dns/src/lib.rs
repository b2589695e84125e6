//! Consul-style DNS over the registry, on UDP and TCP: `<svc>.service.consul`,
//! `<tag>.<svc>.service.consul`, `<svc>.service.<dc>.consul`, RFC 2782 `_<svc>._<tag>.service.consul`,
//! `<node>.node.consul` and `<hex-ip>.addr.<dc>.consul`, the same under `.zhili`. A/AAAA and SRV
//! records of serving instances only, shuffled; UDP answers that do not fit are truncated with
//! the TC bit (the full answer comes over TCP). Unknown names get NXDOMAIN with the SOA.
//! Malformed packets are dropped. Messages are parsed and written by hickory-proto.
//!
//! The registry is reached through [`Catalog`], which the binary implements (this crate sits
//! beside the registry and does not import it).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

/// Largest UDP answer we send, whatever EDNS0 advertises.
const MAX_UDP_PAYLOAD: usize = 4096;
/// Idle TCP connections are closed after this.
const TCP_IDLE: Duration = Duration::from_secs(10);
const MAX_TCP_CONNECTIONS: usize = 1024;

/// One serving instance as DNS shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub node: String,
    pub address: String,
    pub port: u16,
}

/// What DNS needs from the registry.
pub trait Catalog: Send + Sync + 'static {
    /// Serving instances of a service (with every tag given). `None` if there is no such
    /// service; an empty list if it exists with nothing serving.
    fn service(&self, name: &str, tag: Option<&str>) -> Option<Vec<Endpoint>>;
    /// The address of a node, if known.
    fn node(&self, name: &str) -> Option<String>;
}

pub struct DnsServer {
    catalog: Arc<dyn Catalog>,
    datacenter: String,
    domains: Vec<Name>,
    ttl: u32,
}

enum Lookup {
    Service { name: String, tag: Option<String> },
    Node(String),
    Addr(IpAddr),
}

impl DnsServer {
    pub fn new(catalog: Arc<dyn Catalog>, datacenter: &str, ttl: Duration) -> Arc<Self> {
        let domains = ["consul.", "zhili."].iter().map(|d| Name::from_ascii(d).expect("static domain")).collect();
        Arc::new(Self { catalog, datacenter: datacenter.to_ascii_lowercase(), domains, ttl: ttl.as_secs() as u32 })
    }

    /// Answers one query packet (`udp`: bound the answer by the UDP payload limit). `None` means
    /// drop the packet: it is not a parseable query.
    pub fn answer(&self, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
        let req = Message::from_vec(packet).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(req.metadata.id, req.metadata.op_code);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.authoritative = true;
        if let Some(edns) = &req.edns {
            let mut e = Edns::new();
            e.set_max_payload(edns.max_payload().clamp(512, MAX_UDP_PAYLOAD as u16));
            resp.set_edns(e);
        }
        if req.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return resp.to_vec().ok();
        }
        let [q] = req.queries.as_slice() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp.to_vec().ok();
        };
        let q = q.clone();
        resp.add_query(q.clone());
        self.resolve(&q, &mut resp);
        let bytes = resp.to_vec().ok()?;
        let limit = if udp { (req.max_payload() as usize).min(MAX_UDP_PAYLOAD) } else { 65_535 };
        if bytes.len() <= limit {
            return Some(bytes);
        }
        // Too big: drop additionals, then answers from the end, until it fits; say so with TC.
        resp.metadata.truncation = true;
        resp.additionals.clear();
        while !resp.answers.is_empty() {
            let bytes = resp.to_vec().ok()?;
            if bytes.len() <= limit {
                return Some(bytes);
            }
            resp.answers.pop();
        }
        resp.to_vec().ok()
    }

    fn soa(&self, domain: &Name) -> Record {
        let ns = Name::from_ascii("ns").expect("label").append_domain(domain).unwrap_or_else(|_| domain.clone());
        let mbox = Name::from_ascii("hostmaster").expect("label").append_domain(domain).unwrap_or_else(|_| domain.clone());
        let serial = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32);
        Record::from_rdata(domain.clone(), 0, RData::SOA(SOA::new(ns, mbox, serial, 3600, 600, 86_400, 0)))
    }

    fn parse(&self, name: &Name) -> Option<(Name, Lookup)> {
        let lower = name.to_lowercase();
        let domain = self.domains.iter().find(|d| d.zone_of(&lower))?.clone();
        let labels: Vec<String> = lower.iter().map(|l| String::from_utf8_lossy(l).into_owned()).collect();
        let mut rest = labels.get(..labels.len().saturating_sub(domain.num_labels() as usize))?;
        // An optional datacenter label before the domain.
        if let Some((last, head)) = rest.split_last() {
            if *last == self.datacenter && head.last().is_some_and(|k| matches!(k.as_str(), "service" | "node" | "addr")) {
                rest = head;
            }
        }
        let lookup = match rest {
            [svc, kind] if kind == "service" => Lookup::Service { name: svc.trim_start_matches('_').to_string(), tag: None },
            [a, b, kind] if kind == "service" => match (a.strip_prefix('_'), b.strip_prefix('_')) {
                // RFC 2782: _<service>._<protocol or tag>; "tcp"/"udp" mean any tag.
                (Some(svc), Some(tag)) => Lookup::Service { name: svc.into(), tag: (!matches!(tag, "tcp" | "udp")).then(|| tag.to_string()) },
                _ => Lookup::Service { name: b.clone(), tag: Some(a.clone()) },
            },
            [node, kind] if kind == "node" => Lookup::Node(node.clone()),
            [hex, kind] if kind == "addr" => Lookup::Addr(parse_hex_ip(hex)?),
            _ => return Some((domain, Lookup::Node(String::new()))),
        };
        Some((domain, lookup))
    }

    fn resolve(&self, q: &Query, resp: &mut Message) {
        let Some((domain, lookup)) = self.parse(q.name()) else {
            resp.metadata.response_code = ResponseCode::Refused;
            return;
        };
        if q.query_class() != DNSClass::IN && q.query_class() != DNSClass::ANY {
            resp.metadata.response_code = ResponseCode::Refused;
            return;
        }
        let qtype = q.query_type();
        let name = q.name().clone();
        let found = match lookup {
            Lookup::Service { name: svc, tag } => match self.catalog.service(&svc, tag.as_deref()) {
                None => false,
                Some(mut eps) => {
                    eps.shuffle(&mut rand::rng());
                    for ep in &eps {
                        self.service_records(&name, &domain, qtype, ep, resp);
                    }
                    true
                }
            },
            Lookup::Node(node) if !node.is_empty() => match self.catalog.node(&node) {
                Some(addr) => {
                    self.address_records(&name, qtype, &addr, &mut resp.answers);
                    true
                }
                None => false,
            },
            Lookup::Node(_) => false,
            Lookup::Addr(ip) => {
                self.address_records(&name, qtype, &ip.to_string(), &mut resp.answers);
                true
            }
        };
        if !found {
            resp.metadata.response_code = ResponseCode::NXDomain;
        }
        if resp.answers.is_empty() {
            resp.add_authority(self.soa(&domain));
        }
    }

    /// A/AAAA for an IP (per query type), a CNAME for a host name.
    fn address_records(&self, name: &Name, qtype: RecordType, addr: &str, out: &mut Vec<Record>) {
        let rdata = match addr.parse::<IpAddr>() {
            Ok(IpAddr::V4(ip)) if matches!(qtype, RecordType::A | RecordType::ANY) => RData::A(A(ip)),
            Ok(IpAddr::V6(ip)) if matches!(qtype, RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(ip)),
            Ok(_) => return,
            Err(_) => match Name::from_ascii(format!("{addr}.")) {
                Ok(target) if matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::ANY | RecordType::CNAME) => RData::CNAME(CNAME(target)),
                _ => return,
            },
        };
        out.push(Record::from_rdata(name.clone(), self.ttl, rdata));
    }

    fn service_records(&self, name: &Name, domain: &Name, qtype: RecordType, ep: &Endpoint, resp: &mut Message) {
        match qtype {
            RecordType::SRV => {
                // As Consul: the target is <hex-ip>.addr.<dc>.<domain> with the address as an
                // additional record, or the host name itself.
                let target = match ep.address.parse::<IpAddr>() {
                    Ok(ip) => Name::from_ascii(format!("{}.addr.{}", hex_ip(ip), self.datacenter)).and_then(|n| n.append_domain(domain)),
                    Err(_) => Name::from_ascii(format!("{}.", ep.address)),
                };
                let Ok(target) = target else { return };
                resp.add_answer(Record::from_rdata(name.clone(), self.ttl, RData::SRV(SRV::new(1, 1, ep.port, target.clone()))));
                self.address_records(&target, RecordType::ANY, &ep.address, &mut resp.additionals);
            }
            _ => self.address_records(name, qtype, &ep.address, &mut resp.answers),
        }
    }

    /// Serves UDP until the socket fails; one task per core shares the socket.
    pub async fn serve_udp(self: Arc<Self>, socket: Arc<UdpSocket>) {
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = match socket.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on some systems: keep going.
                    tracing::debug!(error = %e, "dns udp receive failed");
                    continue;
                }
            };
            if let Some(out) = buf.get(..n).and_then(|packet| self.answer(packet, true)) {
                let _ = socket.send_to(&out, peer).await;
            }
        }
    }

    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                if let Err(e) = this.tcp_connection(stream).await {
                    tracing::debug!(error = %e, %peer, "dns tcp connection ended");
                }
            });
        }
    }

    async fn tcp_connection(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut buf = vec![0u8; 65_535];
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return Ok(()),
            }
            // The buffer holds 65,535 bytes, the most a u16 length can announce.
            let Some(packet) = buf.get_mut(..usize::from(u16::from_be_bytes(len))) else { return Ok(()) };
            tokio::time::timeout(TCP_IDLE, stream.read_exact(packet)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
            let Some(out) = self.answer(packet, false) else { return Ok(()) };
            let mut framed = Vec::with_capacity(out.len() + 2);
            framed.extend_from_slice(&(out.len() as u16).to_be_bytes());
            framed.extend_from_slice(&out);
            tokio::time::timeout(TCP_IDLE, stream.write_all(&framed)).await.map_err(|_| std::io::ErrorKind::TimedOut)??;
        }
    }
}

/// Binds UDP and TCP on one port (a free one for port 0) and serves both; returns the address.
pub async fn listen(server: Arc<DnsServer>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let mut last_err = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(addr).await?;
        let local = udp.local_addr()?;
        match TcpListener::bind(local).await {
            Ok(tcp) => {
                let udp = Arc::new(udp);
                let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
                for _ in 0..workers {
                    tokio::spawn(server.clone().serve_udp(udp.clone()));
                }
                tokio::spawn(server.serve_tcp(tcp));
                return Ok(local);
            }
            // Port 0 gave a UDP port whose TCP twin is taken: try another.
            Err(e) if addr.port() == 0 => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| std::io::Error::other("no free port for UDP and TCP")))
}

fn hex_ip(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.octets().iter().map(|b| format!("{b:02x}")).collect(),
        IpAddr::V6(v6) => v6.octets().iter().map(|b| format!("{b:02x}")).collect(),
    }
}

fn parse_hex_ip(hex: &str) -> Option<IpAddr> {
    let bytes: Option<Vec<u8>> = (0..hex.len()).step_by(2).map(|i| hex.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
    match bytes?.as_slice() {
        &[a, b, c, d] => Some(IpAddr::from([a, b, c, d])),
        b if b.len() == 16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(b);
            Some(IpAddr::from(a))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
