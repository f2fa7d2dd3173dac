//! The etcd reference: a local three-member etcd cluster, driven over its native gRPC API (the
//! fastest way in, as etcd's own clients and benchmark use it) with one HTTP/2 connection per
//! writer. The first writer talks to the leader, as Warden's bench client does once it has
//! learned the leader from a reply; further writers are spread over the members.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::{BufMut, Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A running etcd cluster; its processes are killed on drop.
pub struct Etcd {
    _members: Vec<Child>,
    pub client_addrs: Vec<String>,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Etcd {
    /// Starts three members under `dir` and waits until the cluster takes writes.
    pub async fn start(dir: &Path) -> anyhow::Result<Etcd> {
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> = (0..3)
            .map(|i| format!("e{i}=http://127.0.0.1:{}", peers[i]))
            .collect();
        let mut members = Vec::new();
        for i in 0..3 {
            let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
            let child = Command::new("etcd")
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-{i}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{}", clients[i]),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{}", clients[i]),
                ])
                .args([
                    "--listen-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[i]),
                ])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{}", peers[i]),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "warden-bench",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .context("start etcd (install it: apt-get install etcd-server)")?;
            members.push(child);
        }
        let etcd = Etcd {
            _members: members,
            client_addrs: clients.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = Grpc::connect(&etcd.client_addrs[0]).await {
                if c.put(b"warmup", b"1").await.is_ok() {
                    return Ok(etcd);
                }
            }
            if Instant::now() > deadline {
                bail!("etcd did not take writes within 30 s (logs in {dir:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The members' client addresses, the leader's first. Waits up to 5 s for a member to say
    /// it leads (say after an election); then keeps the members' own order.
    pub async fn leader_first(&self) -> Vec<String> {
        let mut addrs = self.client_addrs.clone();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            for (i, addr) in self.client_addrs.iter().enumerate() {
                let status = match Grpc::connect(addr).await {
                    Ok(mut c) => c.status().await,
                    Err(e) => Err(e),
                };
                match status {
                    Ok((member, Some(leader))) if member == leader => {
                        addrs.rotate_left(i);
                        return addrs;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(addr, error = %e, "etcd member gave no status"),
                }
            }
            if Instant::now() > deadline {
                tracing::warn!("no etcd member says it leads; writers keep the members' order");
                return addrs;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How long one connection or call may take; a stalled member must not hang the bench.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// A gRPC client for etcd's v3 API, the way etcd's own clients talk to it: one HTTP/2
/// connection (the `h2` crate) and unary calls with hand-encoded protobuf, which for the two
/// messages the bench needs is a few bytes of framing.
pub struct Grpc {
    send: h2::client::SendRequest<Bytes>,
    authority: String,
}

impl Grpc {
    pub async fn connect(addr: &str) -> anyhow::Result<Grpc> {
        tokio::time::timeout(CALL_TIMEOUT, Self::connect_inner(addr))
            .await
            .with_context(|| format!("connecting to etcd at {addr} took over {CALL_TIMEOUT:?}"))?
    }

    async fn connect_inner(addr: &str) -> anyhow::Result<Grpc> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (send, connection) = h2::client::handshake(stream).await?;
        // The connection task ends when `send` and every stream are dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "etcd connection ended");
            }
        });
        Ok(Grpc {
            send,
            authority: addr.to_string(),
        })
    }

    /// One unary call: `method` is `/package.Service/Method`, `message` the encoded request.
    async fn call(&mut self, method: &str, message: &[u8]) -> anyhow::Result<Bytes> {
        tokio::time::timeout(CALL_TIMEOUT, self.call_inner(method, message))
            .await
            .with_context(|| format!("etcd did not answer {method} within {CALL_TIMEOUT:?}"))?
    }

    async fn call_inner(&mut self, method: &str, message: &[u8]) -> anyhow::Result<Bytes> {
        let request = http::Request::post(format!("http://{}{method}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let mut frame = BytesMut::with_capacity(5 + message.len());
        frame.put_u8(0); // not compressed
        frame.put_u32(u32::try_from(message.len())?);
        frame.put_slice(message);
        let mut send = self.send.clone().ready().await?;
        let (response, mut body_out) = send.send_request(request, false)?;
        body_out.send_data(frame.freeze(), true)?;
        let (head, mut body) = response.await?.into_parts();
        if head.status != http::StatusCode::OK {
            bail!("etcd answered HTTP {}", head.status);
        }
        let mut reply = BytesMut::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk?;
            let _ = body.flow_control().release_capacity(chunk.len());
            reply.extend_from_slice(&chunk);
        }
        // A failed call may carry its status in the headers alone ("trailers-only").
        let trailers = body.trailers().await?.unwrap_or_default();
        let status = trailers
            .get("grpc-status")
            .or_else(|| head.headers.get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if status != "0" {
            let message = trailers
                .get("grpc-message")
                .or_else(|| head.headers.get("grpc-message"))
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            bail!("etcd answered grpc-status {status:?}: {message}");
        }
        // One message: not compressed, then its length, then the message itself.
        let declared = reply
            .get(1..5)
            .map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]));
        match (reply.first(), declared) {
            (Some(0), Some(len)) if len as usize == reply.len() - 5 => {}
            _ => bail!("etcd's reply is not one uncompressed gRPC message"),
        }
        Ok(reply.freeze().slice(5..))
    }

    /// One `put`, acknowledged by etcd after a quorum has it on disk.
    pub async fn put(&mut self, key: &[u8], value: &[u8]) -> anyhow::Result<()> {
        // PutRequest { key = 1; value = 2 }
        let mut message = Vec::with_capacity(key.len() + value.len() + 8);
        proto_bytes(&mut message, 1, key);
        proto_bytes(&mut message, 2, value);
        self.call("/etcdserverpb.KV/Put", &message).await?;
        Ok(())
    }

    /// This member's id and the id of the member it takes for the leader, if it knows one.
    pub async fn status(&mut self) -> anyhow::Result<(u64, Option<u64>)> {
        let reply = self.call("/etcdserverpb.Maintenance/Status", &[]).await?;
        // StatusResponse { ResponseHeader header = 1 { member_id = 2 }; leader = 4 }
        let (mut member, mut leader) = (None, None);
        for (field, value) in proto_fields(&reply)? {
            match (field, value) {
                (1, Field::Bytes(header)) => {
                    for (f, v) in proto_fields(header)? {
                        if let (2, Field::Varint(id)) = (f, v) {
                            member = Some(id);
                        }
                    }
                }
                // proto3 leaves out a zero: no field means no leader.
                (4, Field::Varint(id)) if id != 0 => leader = Some(id),
                _ => {}
            }
        }
        let member = member.context("etcd's status names no member")?;
        Ok((member, leader))
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn proto_bytes(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, field << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
}

fn varint(buf: &mut &[u8]) -> anyhow::Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().context("truncated protobuf varint")?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("protobuf varint longer than 64 bits")
}

/// The fields of a protobuf message, in order; 32- and 64-bit fields are skipped.
fn proto_fields(mut buf: &[u8]) -> anyhow::Result<Vec<(u64, Field<'_>)>> {
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let key = varint(&mut buf)?;
        let skip = |buf: &mut &[u8], n: usize| -> anyhow::Result<()> {
            anyhow::ensure!(buf.len() >= n, "truncated protobuf field");
            *buf = &buf[n..];
            Ok(())
        };
        match key & 7 {
            0 => fields.push((key >> 3, Field::Varint(varint(&mut buf)?))),
            1 => skip(&mut buf, 8)?,
            2 => {
                let n = usize::try_from(varint(&mut buf)?)?;
                anyhow::ensure!(buf.len() >= n, "truncated protobuf field");
                let (value, rest) = buf.split_at(n);
                fields.push((key >> 3, Field::Bytes(value)));
                buf = rest;
            }
            5 => skip(&mut buf, 4)?,
            wire => bail!("unsupported protobuf wire type {wire}"),
        }
    }
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_fields_round_trip_and_truncation_is_an_error() {
        let mut header = Vec::new();
        put_varint(&mut header, 1 << 3); // cluster_id
        put_varint(&mut header, 300);
        put_varint(&mut header, 2 << 3); // member_id
        put_varint(&mut header, u64::MAX);
        let mut status = Vec::new();
        proto_bytes(&mut status, 1, &header);
        proto_bytes(&mut status, 2, b"3.4.23");
        put_varint(&mut status, 3 << 3 | 1); // a fixed64 to skip
        status.extend_from_slice(&[0; 8]);
        put_varint(&mut status, 4 << 3);
        put_varint(&mut status, 7);

        let fields = proto_fields(&status).unwrap();
        let leader = fields.iter().find_map(|(f, v)| match (f, v) {
            (4, Field::Varint(id)) => Some(*id),
            _ => None,
        });
        assert_eq!(leader, Some(7));
        let Some((_, Field::Bytes(h))) = fields.iter().find(|(f, _)| *f == 1) else {
            panic!("no header field");
        };
        let member = proto_fields(h)
            .unwrap()
            .into_iter()
            .find_map(|(f, v)| match (f, v) {
                (2, Field::Varint(id)) => Some(id),
                _ => None,
            });
        assert_eq!(member, Some(u64::MAX));

        assert!(proto_fields(&status[..status.len() - 1]).is_err());
        assert!(proto_fields(&header[..4]).is_err()); // a key without its value
    }
}
