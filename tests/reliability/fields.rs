//! Caps on what a frame carries besides its image: an oversized field is a
//! per-frame FIELD_TOO_LARGE, and the verdict that says so stays small (the
//! id is cut, oversized attributes are not echoed).

use std::collections::HashMap;

use odin_sidecar::wire::odin_v1::{Frame, ScoringOverride, Verdict};

use crate::harness::*;

fn assert_too_large(verdict: &Verdict, field: &str) {
    assert_eq!(reason(verdict), "FIELD_TOO_LARGE", "{verdict:?}");
    assert_eq!(code(verdict), 3, "INVALID_ARGUMENT");
    let message = &verdict.error.as_ref().expect("error").message;
    assert!(message.contains(field), "{message:?} names {field:?}");
}

fn with_attributes(id: &str, n: usize, value_len: usize) -> Frame {
    Frame {
        attributes: (0..n)
            .map(|i| (format!("k{i:02}"), "v".repeat(value_len)))
            .collect::<HashMap<_, _>>(),
        ..tiny(id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_fields_are_refused_and_not_echoed_whole() {
    let server = Server::start(config()).await;
    let client = server.client().await;
    let ask = |frame: Frame| {
        let mut client = client.clone();
        async move {
            client
                .detect_one(frame)
                .await
                .expect("DetectOne")
                .into_inner()
        }
    };

    // A 1 MB frame_id: refused, echoed cut to the 256-byte cap.
    let id: String = (0..1_000_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let verdict = ask(Frame {
        frame_id: id.clone(),
        ..tiny("")
    })
    .await;
    assert_too_large(&verdict, "frame_id");
    assert_eq!(verdict.frame_id, id[..256], "the id is cut to 256 bytes");

    // Cut on a character boundary: 255 ASCII bytes then 'é' (2 bytes)
    // straddles the cap, so 255 bytes come back, still valid UTF-8.
    let id = format!("{}{}", "x".repeat(255), "é".repeat(10));
    let verdict = ask(Frame {
        frame_id: id,
        ..tiny("")
    })
    .await;
    assert_too_large(&verdict, "frame_id");
    assert_eq!(verdict.frame_id, "x".repeat(255));

    // At the cap: fine.
    let verdict = ask(Frame {
        frame_id: "y".repeat(256),
        ..tiny("")
    })
    .await;
    assert_judged(&verdict);
    assert_eq!(verdict.frame_id.len(), 256);

    // 33 attributes: refused, none echoed; 32 are fine and echoed.
    let verdict = ask(with_attributes("33", 33, 1)).await;
    assert_too_large(&verdict, "attributes");
    assert!(verdict.attributes.is_empty(), "{:?}", verdict.attributes);
    assert_eq!(verdict.frame_id, "33");
    let verdict = ask(with_attributes("32", 32, 1)).await;
    assert_judged(&verdict);
    assert_eq!(verdict.attributes.len(), 32);

    // One attribute over 1024 bytes (key + value): refused, none echoed.
    let verdict = ask(with_attributes("long", 1, 1022)).await;
    assert_too_large(&verdict, "attribute");
    assert!(verdict.attributes.is_empty());

    // A 40-byte method name: refused.
    let verdict = ask(Frame {
        scoring: Some(ScoringOverride {
            method: "m".repeat(40),
            ..ScoringOverride::default()
        }),
        ..tiny("method")
    })
    .await;
    assert_too_large(&verdict, "scoring.method");

    // On a stream, each oversized frame is answered and the stream goes on.
    let frames = vec![
        tiny("s0"),
        Frame {
            frame_id: "z".repeat(300),
            ..tiny("")
        },
        with_attributes("s2", 40, 1),
        tiny("s3"),
    ];
    let verdicts = detect_all(server.client().await, frames).await;
    let reasons: Vec<&str> = verdicts.iter().map(reason).collect();
    assert_eq!(reasons, ["", "FIELD_TOO_LARGE", "FIELD_TOO_LARGE", ""]);
    assert_eq!(verdicts[1].frame_id, "z".repeat(256));
    assert!(verdicts[2].attributes.is_empty());

    let text = server.scrape().await;
    let counted = metric(
        &text,
        r#"odin_frame_errors_total{reason="FIELD_TOO_LARGE"}"#,
    );
    assert_eq!(counted, 7.0, "every refused frame is counted by reason");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caps_are_configurable() {
    let mut config = config();
    config.fields.max_id_bytes = 8;
    config.fields.max_attributes = 2;
    let server = Server::start(config).await;
    let mut client = server.client().await;
    let verdict = client
        .detect_one(Frame {
            frame_id: "123456789".into(),
            ..tiny("")
        })
        .await
        .expect("DetectOne")
        .into_inner();
    assert_too_large(&verdict, "frame_id");
    assert_eq!(verdict.frame_id, "12345678");
    let verdict = client
        .detect_one(with_attributes("three", 3, 1))
        .await
        .expect("DetectOne")
        .into_inner();
    assert_too_large(&verdict, "attributes");
}
