//! The connection between the nodes of a run over several processes: TCP
//! streams to node 0, which sums every node's frame in node order.

use super::{lead_port, Nodes};
use crate::error::LlamaError;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// The connection between the nodes of a multi-node run: node 0 holds one
/// to every other node (in node order), the others one to node 0. A sum is
/// a frame from every node to node 0 (the value count, then the f32
/// values, little-endian), which adds them in node order and sends the
/// total back; every node gets the same bits.
#[derive(Debug)]
pub struct NodeLink {
    streams: Vec<TcpStream>,
    lead: bool,
    timeout: Duration,
}

const HELLO: &[u8; 8] = b"meloraDP";

fn io_error(what: &str, e: std::io::Error, timeout: Duration) -> LlamaError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            LlamaError::Peers(format!("{what}: no answer in {} s (--peer-timeout)", timeout.as_secs()))
        }
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe => {
            LlamaError::Peers(format!(
                "{what}: the connection closed (that node stopped; see its log)"
            ))
        }
        _ => LlamaError::Peers(format!("{what}: {e}")),
    }
}

impl NodeLink {
    /// Node 0 waits for the other nodes to connect, the others connect to
    /// it (retrying until the timeout).
    pub fn connect(nodes: &Nodes, devices: usize) -> crate::Result<Self> {
        let timeout = Duration::from_secs(nodes.timeout_seconds.max(1));
        let deadline = std::time::Instant::now() + timeout;
        let port = lead_port(&nodes.lead)
            .ok_or_else(|| LlamaError::Peers(format!("the lead's address {:?} is not HOST:PORT", nodes.lead)))?;
        let streams = if nodes.rank == 0 {
            let listener = TcpListener::bind(("0.0.0.0", port))
                .map_err(|e| LlamaError::Peers(format!("node 0 cannot listen on port {port}: {e}")))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| io_error("listening", e, timeout))?;
            let mut slots: Vec<Option<TcpStream>> = (1..nodes.count).map(|_| None).collect();
            while slots.iter().any(Option::is_none) {
                match listener.accept() {
                    Ok((mut stream, from)) => {
                        stream
                            .set_nonblocking(false)
                            .map_err(|e| io_error("accepting", e, timeout))?;
                        stream
                            .set_read_timeout(Some(timeout))
                            .map_err(|e| io_error("accepting", e, timeout))?;
                        let mut hello = [0u8; 20];
                        stream
                            .read_exact(&mut hello)
                            .map_err(|e| io_error(&format!("the greeting of {from}"), e, timeout))?;
                        let rank = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes"));
                        let count = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes"));
                        let theirs = u32::from_le_bytes(hello[16..20].try_into().expect("4 bytes"));
                        if &hello[..8] != HELLO || count != nodes.count || rank == 0 || rank >= count {
                            return Err(LlamaError::Peers(format!(
                                "{from} is not a node of this run (it says node {rank} of {count}; this run has {} nodes)",
                                nodes.count
                            )));
                        }
                        if theirs as usize != devices {
                            return Err(LlamaError::Peers(format!("node {rank} has {theirs} devices and node 0 has {devices}: every node needs the same --devices")));
                        }
                        let slot = &mut slots[rank as usize - 1];
                        if slot.is_some() {
                            return Err(LlamaError::Peers(format!("two nodes say they are node {rank}")));
                        }
                        *slot = Some(stream);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if std::time::Instant::now() > deadline {
                            let missing: Vec<String> = slots
                                .iter()
                                .enumerate()
                                .filter(|s| s.1.is_none())
                                .map(|s| (s.0 + 1).to_string())
                                .collect();
                            return Err(LlamaError::Peers(format!(
                                "nodes {} did not connect in {} s",
                                missing.join(", "),
                                timeout.as_secs()
                            )));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    Err(e) => return Err(io_error("accepting", e, timeout)),
                }
            }
            slots.into_iter().map(|s| s.expect("every node connected")).collect()
        } else {
            let stream = loop {
                match TcpStream::connect(nodes.lead.as_str()) {
                    Ok(stream) => break stream,
                    Err(e) if std::time::Instant::now() > deadline => {
                        return Err(LlamaError::Peers(format!(
                            "cannot reach node 0 at {} in {} s: {e}",
                            nodes.lead,
                            timeout.as_secs()
                        )))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            };
            let mut stream = stream;
            let mut hello = HELLO.to_vec();
            hello.extend(nodes.rank.to_le_bytes());
            hello.extend(nodes.count.to_le_bytes());
            hello.extend((devices as u32).to_le_bytes());
            stream
                .write_all(&hello)
                .map_err(|e| io_error("greeting node 0", e, timeout))?;
            vec![stream]
        };
        for stream in &streams {
            stream.set_nodelay(true).ok();
            stream
                .set_read_timeout(Some(timeout))
                .map_err(|e| io_error("the node link", e, timeout))?;
            stream
                .set_write_timeout(Some(timeout))
                .map_err(|e| io_error("the node link", e, timeout))?;
        }
        Ok(Self {
            streams,
            lead: nodes.rank == 0,
            timeout,
        })
    }

    /// `values` summed over the nodes, in place.
    pub fn sum(&mut self, values: &mut [f32]) -> crate::Result<()> {
        let timeout = self.timeout;
        if self.lead {
            let mut theirs = vec![0f32; values.len()];
            for (k, stream) in self.streams.iter_mut().enumerate() {
                read_frame(stream, &mut theirs).map_err(|e| match e {
                    FrameError::Io(e) => io_error(&format!("node {}", k + 1), e, timeout),
                    FrameError::Length(n) => {
                        LlamaError::Peers(format!("node {} sent {n} values, node 0 has {}", k + 1, values.len()))
                    }
                })?;
                for (v, t) in values.iter_mut().zip(&theirs) {
                    *v += t;
                }
            }
            for (k, stream) in self.streams.iter_mut().enumerate() {
                write_frame(stream, values).map_err(|e| io_error(&format!("node {}", k + 1), e, timeout))?;
            }
        } else {
            let stream = &mut self.streams[0];
            write_frame(stream, values).map_err(|e| io_error("node 0", e, timeout))?;
            read_frame(stream, values).map_err(|e| match e {
                FrameError::Io(e) => io_error("node 0", e, timeout),
                FrameError::Length(n) => {
                    LlamaError::Peers(format!("node 0 sent {n} values, this node has {}", values.len()))
                }
            })?;
        }
        Ok(())
    }
}

enum FrameError {
    Io(std::io::Error),
    Length(u64),
}

fn write_frame(stream: &mut TcpStream, values: &[f32]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + 4 * values.len());
    bytes.extend((values.len() as u64).to_le_bytes());
    for v in values {
        bytes.extend(v.to_le_bytes());
    }
    stream.write_all(&bytes)
}

fn read_frame(stream: &mut TcpStream, out: &mut [f32]) -> Result<(), FrameError> {
    let mut len = [0u8; 8];
    stream.read_exact(&mut len).map_err(FrameError::Io)?;
    let len = u64::from_le_bytes(len);
    // Checked before anything is read or allocated: a frame of another
    // length is another run's (or no frame at all).
    if len != out.len() as u64 {
        return Err(FrameError::Length(len));
    }
    let mut bytes = vec![0u8; 4 * out.len()];
    stream.read_exact(&mut bytes).map_err(FrameError::Io)?;
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(())
}
