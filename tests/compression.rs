//! permessage-deflate (RFC 7692) against the real server, with a raw
//! client written here from the RFC: the handshake offer, masked and
//! compressed frames out, compressed frames in. (tungstenite, the
//! library client the other tests use, has no compression.)

mod common;

use std::time::Duration;

use common::raw::{Raw, TAIL, deflate};
use common::{api_post, publish, start_with};
use flate2::{Decompress, FlushDecompress};
use serde_json::json;

const API_KEY: &str = "publish-key-0123456789";
const AGREED: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A JSON text of about `n` bytes.
fn chatty(n: usize) -> String {
    let item = r#"{"city":"Paris","temperature_c":12.5,"wind_kmh":9.0},"#;
    let mut s = String::from("[");
    while s.len() + item.len() < n {
        s.push_str(item);
    }
    s.pop();
    s.push(']');
    s
}

#[tokio::test]
async fn deflate_is_agreed_and_messages_compress_both_ways() {
    let server = start_with(|c| c.server.echo = true).await;
    let mut ws = Raw::connect(
        server.addr,
        "/echo",
        Some("permessage-deflate; client_max_window_bits"),
    )
    .await;
    assert_eq!(ws.extensions.as_deref(), Some(AGREED));

    let big = chatty(2000);
    // Compressed in, compressed out.
    ws.compressed_text(&big).await;
    let f = ws.next().await;
    assert!(f.compressed, "a long message is compressed");
    assert!(f.payload.len() < big.len() / 5, "{} bytes", f.payload.len());
    assert_eq!(f.text(), big);
    // Plain in (per-message: a client may send either), compressed out.
    ws.text(&big).await;
    assert_eq!(ws.next().await.text(), big);
    // Short messages go out as they are.
    ws.compressed_text("hello").await;
    let f = ws.next().await;
    assert!(!f.compressed);
    assert_eq!(f.text(), "hello");
    // A compressed message in three fragments: RSV1 on the first only.
    let packed = deflate(big.as_bytes());
    let (a, rest) = packed.split_at(packed.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    ws.frame(false, true, 1, a).await;
    ws.frame(true, false, 9, b"ping between fragments").await;
    ws.frame(false, false, 0, b).await;
    ws.frame(true, false, 0, c).await;
    let pong = ws.next().await;
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (10, &b"ping between fragments"[..])
    );
    assert_eq!(ws.next().await.text(), big);

    assert!(server.sample("gale_compressed_connections_total").await >= 1.0);
    assert!(server.sample("gale_compressed_messages_total").await >= 2.0);
    let (into, out) = (
        server.sample("gale_compression_in_bytes_total").await,
        server.sample("gale_compression_out_bytes_total").await,
    );
    assert!(out > 0.0 && out < into / 5.0, "{out} of {into}");
}

#[tokio::test]
async fn a_window_the_client_limits_is_respected_and_an_unknown_offer_declined() {
    let server = start_with(|c| c.server.echo = true).await;
    // The first offer has a parameter the server does not know: declined,
    // and the second one taken.
    let mut ws = Raw::connect(
        server.addr,
        "/echo",
        Some("permessage-deflate; x_unknown, permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        ws.extensions.as_deref(),
        Some(format!("{AGREED}; server_max_window_bits=10").as_str())
    );
    let big = chatty(5000);
    ws.text(&big).await;
    let f = ws.next().await;
    assert!(f.compressed);
    // A 10-bit inflater reads it: no match reaches further back.
    let mut d = Decompress::new_with_window_bits(false, 10);
    let mut input = f.payload.clone();
    input.extend_from_slice(&TAIL);
    let mut out = Vec::with_capacity(big.len() + 64);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("inflates with a 1 KiB window");
    assert_eq!(out, big.as_bytes());

    let none = Raw::connect(server.addr, "/echo", Some("x-webkit-deflate-frame")).await;
    assert_eq!(none.extensions, None);
}

#[tokio::test]
async fn compression_off_agrees_to_nothing_and_rsv1_is_a_protocol_error() {
    let server = start_with(|c| {
        c.server.echo = true;
        c.server.compression = gale::config::Compression::Off;
    })
    .await;
    let mut ws = Raw::connect(server.addr, "/echo", Some("permessage-deflate")).await;
    assert_eq!(ws.extensions, None);
    ws.text(&chatty(2000)).await;
    assert!(!ws.next().await.compressed);
    ws.compressed_text("hello").await;
    assert_eq!(ws.next().await.close_code(), 1002);
}

#[tokio::test]
async fn a_message_that_inflates_past_the_limit_closes_1009() {
    let server = start_with(|c| c.server.echo = true).await;
    let mut ws = Raw::connect(server.addr, "/echo", Some("permessage-deflate")).await;
    let limit = 131_072;
    // 2 MiB of zeros deflate to a few KiB: small on the wire, not inside.
    let bomb = deflate(&vec![b'a'; 16 * limit]);
    assert!(bomb.len() < limit / 8);
    ws.frame(true, true, 1, &bomb).await;
    assert_eq!(ws.next().await.close_code(), 1009);
    // Garbage that is not deflate at all is refused too, with 1007.
    let mut ws = Raw::connect(server.addr, "/echo", Some("permessage-deflate")).await;
    ws.frame(true, true, 1, &[0xFF, 0xFF, 0xFF, 0xFF, 0x12])
        .await;
    assert_eq!(ws.next().await.close_code(), 1007);
}

/// `n` connections with compression agreed, subscribed to "news".
async fn compressed_subscribers(server: &common::TestServer, n: usize) -> Vec<Raw> {
    let mut all = Vec::new();
    for i in 0..n {
        let mut ws = Raw::connect(server.addr, "/ws", Some("permessage-deflate")).await;
        assert_eq!(ws.extensions.as_deref(), Some(AGREED));
        let sub =
            json!({"event": "topic.subscribe", "data": {"topic": "news"}, "ref": i.to_string()});
        ws.compressed_text(&sub.to_string()).await;
        let (_, reply) = ws.next_json().await;
        assert_eq!(reply["ok"], true, "{reply}");
        all.push(ws);
    }
    all
}

#[tokio::test]
async fn a_broadcast_is_compressed_once_for_all_its_compressed_recipients() {
    let server = start_with(|c| c.api.key = Some(API_KEY.into())).await;
    let mut compressed = compressed_subscribers(&server, 3).await;
    let mut plain = server.client().await;
    let r = plain
        .request("topic.subscribe", json!({"topic": "news"}), "p")
        .await;
    assert_eq!(r["ok"], true, "{r}");

    let before = server.sample("gale_compressed_messages_total").await;
    let data = chatty(1000);
    let body = json!({"event": "headline", "data": data, "topic": "news"}).to_string();
    let (status, reached) = publish(&server, Some(API_KEY), &body).await;
    assert_eq!((status, reached["reached"].as_u64()), (200, Some(4)));

    let expected = plain.next_push().await;
    assert_eq!(expected["data"], data.as_str());
    for ws in &mut compressed {
        let (was_compressed, push) = ws.next_json().await;
        assert!(was_compressed, "a 1 KB push to a compressed connection");
        assert_eq!(push, expected);
    }
    // One compression served all three.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        server.sample("gale_compressed_messages_total").await - before,
        1.0
    );
}

/// Pushes delivered together to many connections share one buffer: the
/// plain ones write it whole, the compressed ones message by message,
/// each compressed. Every recipient gets every push, in order.
#[tokio::test]
async fn a_run_of_pushes_reaches_compressed_and_plain_recipients_in_order() {
    let server = start_with(|c| c.api.key = Some(API_KEY.into())).await;
    let mut compressed = compressed_subscribers(&server, 3).await;
    let mut plain = Vec::new();
    for i in 0..2 {
        let mut c = server.client().await;
        let r = c
            .request(
                "topic.subscribe",
                json!({"topic": "news"}),
                &format!("p{i}"),
            )
            .await;
        assert_eq!(r["ok"], true, "{r}");
        plain.push(c);
    }
    let body = chatty(600);
    let compressed_before = server.sample("gale_compressed_messages_total").await;
    let mut published = 0.0;
    // Until the delivery task has gathered more than one push at once
    // (a batch of publications usually is, at once).
    let mut together = false;
    for round in 0..20 {
        let data: Vec<String> = (0..8).map(|i| format!("{round}-{i}-{body}")).collect();
        let commands: Vec<serde_json::Value> = data
            .iter()
            .map(|d| json!({"method": "publish", "params": {"event": "e", "topic": "news", "data": d}}))
            .collect();
        let batch = json!({ "commands": commands }).to_string();
        let (status, _) = api_post(server.addr, Some(API_KEY), "batch", &batch).await;
        assert_eq!(status, 200);
        published += data.len() as f64;
        for c in &mut plain {
            for d in &data {
                assert_eq!(c.next_push().await["data"], d.as_str());
            }
        }
        for ws in &mut compressed {
            for d in &data {
                let (was_compressed, push) = ws.next_json().await;
                assert!(was_compressed, "a 600-byte push to a compressed connection");
                assert_eq!(push["data"], d.as_str());
            }
        }
        let batches = server.sample("gale_broadcast_batch_count").await;
        if server.sample("gale_broadcast_batch_sum").await > batches {
            together = true;
            break;
        }
    }
    assert!(together, "no two pushes were ever delivered together");
    // Each compressed once, whatever run its recipients got it in.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        server.sample("gale_compressed_messages_total").await - compressed_before,
        published
    );
}
