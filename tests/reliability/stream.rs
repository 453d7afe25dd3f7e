//! Stream semantics: a message the server cannot decode ends the stream with
//! the client's error, after exactly the answers due for the frames before
//! it; nothing after it is answered, and the end is never OK.

use odin_sidecar::config::MAX_MESSAGE_BYTES;
use odin_sidecar::wire::odin_v1::Frame;
use prost::Message;
use tonic::Code;

use crate::harness::*;

/// `frame_id` holding the bytes 0xff 0xfe: not UTF-8.
fn bad_utf8_id() -> Vec<u8> {
    vec![0x0a, 0x02, 0xff, 0xfe]
}

/// One attribute whose key is 0xff 0xfe.
fn bad_utf8_attribute_key() -> Vec<u8> {
    // Field 5 (map entry), length 7: key (field 1) = ff fe, value (field 2) = "v".
    let entry = [0x0a, 0x02, 0xff, 0xfe, 0x12, 0x01, b'v'];
    let mut message = tiny("ok").encode_to_vec();
    message.push(0x2a);
    message.push(entry.len() as u8);
    message.extend_from_slice(&entry);
    message
}

/// Bytes that are not a `Frame`: seeded noise, checked to fail prost's own
/// decoding so the test does not depend on luck.
fn random_bytes() -> Vec<u8> {
    (0..1000)
        .map(|seed| noise(64, seed))
        .find(|bytes| Frame::decode(bytes.as_slice()).is_err())
        .expect("some noise is not a Frame")
}

/// Every malformed message, named.
fn malformed() -> Vec<(&'static str, Vec<u8>)> {
    let cases = vec![
        ("invalid UTF-8 in frame_id", bad_utf8_id()),
        (
            "invalid UTF-8 in an attribute key",
            bad_utf8_attribute_key(),
        ),
        ("random bytes", random_bytes()),
    ];
    for (name, bytes) in &cases {
        assert!(
            Frame::decode(bytes.as_slice()).is_err(),
            "{name}: prost decodes it, so it does not test anything"
        );
    }
    cases
}

fn good(range: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    range
        .map(|i| tiny(&format!("good-{i}")).encode_to_vec())
        .collect()
}

/// 3 good frames, `bad`, 3 good frames on one stream: exactly the first 3
/// verdicts, in order, then `want`.
async fn three_then(server: &Server, name: &str, bad: Vec<u8>, want: Code) {
    let mut messages = good(0..3);
    messages.push(bad);
    messages.extend(good(3..6));
    let (verdicts, end) = raw_detect(server.channel().await, messages).await;
    let ids: Vec<&str> = verdicts.iter().map(|v| v.frame_id.as_str()).collect();
    assert_eq!(
        ids,
        ["good-0", "good-1", "good-2"],
        "{name}: exactly the verdicts due before the bad message (stream ended {end:?})"
    );
    verdicts.iter().for_each(assert_judged);
    assert_eq!(end.code(), want, "{name}: {end:?}");
    println!(
        "{name}: 3 verdicts, then {:?}: {}",
        end.code(),
        end.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_message_ends_the_stream_with_invalid_argument_after_the_answers_due() {
    let server = Server::start(config()).await;
    for (name, bad) in malformed() {
        three_then(&server, name, bad, Code::InvalidArgument).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_16_mib_ends_the_stream_with_out_of_range_after_the_answers_due() {
    let server = Server::start(config()).await;
    // A valid Frame, one byte over the limit once encoded.
    let mut frame = encoded_frame("huge", vec![0u8; MAX_MESSAGE_BYTES]);
    frame.frame_id = "h".into();
    let huge = frame.encode_to_vec();
    assert!(huge.len() > MAX_MESSAGE_BYTES);
    three_then(&server, "a message over 16 MiB", huge, Code::OutOfRange).await;
    // The server is still fine for everyone.
    let verdict = server
        .client()
        .await
        .detect_one(tiny("after"))
        .await
        .expect("DetectOne after the oversized stream")
        .into_inner();
    assert_judged(&verdict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_detect_one_is_invalid_argument_not_internal() {
    let server = Server::start(config()).await;
    for (name, bad) in malformed() {
        let status = raw_detect_one(server.channel().await, bad)
            .await
            .expect_err(name);
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        assert!(
            status.message().contains("malformed"),
            "{name}: {}",
            status.message()
        );
    }
    let mut huge = encoded_frame("h", vec![0u8; MAX_MESSAGE_BYTES]).encode_to_vec();
    huge.push(0);
    let status = raw_detect_one(server.channel().await, huge)
        .await
        .expect_err("over 16 MiB");
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    // The well-formed bytes of a good frame still work through the same codec.
    let verdict = raw_detect_one(server.channel().await, tiny("fine").encode_to_vec())
        .await
        .expect("a good frame");
    assert_eq!(verdict.frame_id, "fine");
    assert_judged(&verdict);
}
