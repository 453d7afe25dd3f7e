//! Impossible input is refused per frame with its own reason: tensors of
//! values no image could produce, images whose header claims a size the
//! decoder must not allocate, and images of the wrong size for a card that
//! forbids resizing.

use odin_sidecar::model::ModelSource;
use odin_sidecar::wire::odin_v1::{frame::Image, Frame, Tensor, Verdict};
use tonic::transport::Channel;

use crate::harness::*;

const INVALID_ARGUMENT: i32 = 3;

fn tensor_frame(id: &str, value: f32) -> Frame {
    Frame {
        frame_id: id.into(),
        image: Some(Image::Tensor(Tensor {
            shape: vec![1, 3, 32, 32],
            data: vec![value; 3 * 32 * 32],
        })),
        ..Frame::default()
    }
}

async fn one(
    client: &mut odin_sidecar::wire::odin_v1::detector_client::DetectorClient<Channel>,
    frame: Frame,
) -> Verdict {
    client
        .detect_one(frame)
        .await
        .expect("DetectOne")
        .into_inner()
}

fn assert_refused(verdict: &Verdict, reason_: &str, message_has: &str) {
    assert_eq!(reason(verdict), reason_, "{verdict:?}");
    assert_eq!(code(verdict), INVALID_ARGUMENT, "{verdict:?}");
    let message = &verdict.error.as_ref().expect("an error").message;
    assert!(
        message.contains(message_has),
        "{message:?} lacks {message_has:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensors_outside_the_cards_range_are_refused_and_inside_accepted() {
    let server = Server::start(config()).await;
    let mut client = server.client().await;
    // The built-in card's normalization maps pixels 0..=255 to about
    // [-1.99, 2.12]; one unit of margin on each side is accepted.
    for value in [0.0, 2.5, -2.5] {
        assert_judged(&one(&mut client, tensor_frame("in-range", value)).await);
    }
    for value in [1e30, -1e30, 3.5, -3.5] {
        let verdict = one(&mut client, tensor_frame("garbage", value)).await;
        assert_refused(&verdict, "VALUE_OUT_OF_RANGE", "flat index 0");
    }
    // Stream too: the bad tensor is answered, the stream goes on.
    let frames = vec![
        tensor_frame("a", 0.0),
        tensor_frame("b", 1e30),
        tensor_frame("c", 1.0),
    ];
    let mut stream = client
        .detect(tokio_stream::iter(frames))
        .await
        .expect("Detect")
        .into_inner();
    let mut verdicts = Vec::new();
    while let Some(v) = stream.message().await.expect("no stream error") {
        verdicts.push(v);
    }
    let reasons: Vec<&str> = verdicts.iter().map(reason).collect();
    assert_eq!(reasons, ["", "VALUE_OUT_OF_RANGE", ""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_tensor_range_overrides_the_cards() {
    let mut narrow = config();
    narrow.tensor_range = Some((-0.5, 0.5));
    let server = Server::start(narrow).await;
    let mut client = server.client().await;
    assert_judged(&one(&mut client, tensor_frame("zero", 0.0)).await);
    let verdict = one(&mut client, tensor_frame("one", 1.0)).await;
    assert_refused(&verdict, "VALUE_OUT_OF_RANGE", "[-0.5, 0.5]");

    // The same through the binary's flag.
    let mut proc = Proc::serve(&["--addr", "127.0.0.1:0", "--tensor-range=-0.5,0.5"]);
    let mut client = odin_sidecar::wire::odin_v1::detector_client::DetectorClient::new(
        connect(proc.addr().await).await,
    );
    assert_judged(&one(&mut client, tensor_frame("zero", 0.0)).await);
    let verdict = one(&mut client, tensor_frame("one", 1.0)).await;
    assert_refused(&verdict, "VALUE_OUT_OF_RANGE", "[-0.5, 0.5]");
    // 1.0 is inside the card's own range (the test above accepts 2.5), so
    // the flag really replaced it.
    proc.signal("TERM");
    assert!(proc
        .exit(std::time::Duration::from_secs(20))
        .await
        .is_some());
}

/// CRC-32 (IEEE), as PNG chunks use.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for byte in bytes {
        crc ^= u32::from(*byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A tiny valid PNG whose IHDR now claims `width`×`height` (CRC fixed, so
/// only the size is wrong).
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = pattern_png(16, 16);
    assert_eq!(&png[12..16], b"IHDR");
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// A tiny valid baseline JPEG whose SOF0 now claims `width`×`height`.
pub fn jpeg_claiming(width: u16, height: u16) -> Vec<u8> {
    let image = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, 0]));
    let mut jpeg = encode(&image, image::ImageFormat::Jpeg);
    let sof = jpeg
        .windows(2)
        .position(|w| w == [0xff, 0xc0])
        .expect("a baseline SOF0 marker");
    // FF C0, length (2), precision (1), height (2), width (2).
    jpeg[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_header_claims_8192_squared_is_refused_from_the_header() {
    let server = Server::start(config()).await;
    let mut client = server.client().await;
    let png = png_claiming(8192, 8192);
    let jpeg = jpeg_claiming(8192, 8192);
    println!("PNG {} bytes, JPEG {} bytes", png.len(), jpeg.len());
    assert!(png.len() < 2048 && jpeg.len() < 2048);
    for (name, bytes) in [("png", png), ("jpeg", jpeg)] {
        let verdict = one(&mut client, encoded_frame(name, bytes)).await;
        // IMAGE_TOO_LARGE (not DECODE_FAILED from the decoder's own
        // allocation limit) says the header was read and the size refused
        // before decoding.
        assert_refused(&verdict, "IMAGE_TOO_LARGE", "8192x8192");
        let decode_ms = verdict.timings.expect("timings").decode_us / 1000;
        println!("{name}: refused in {decode_ms} ms");
        assert!(decode_ms < 2000, "{name}: {decode_ms} ms to refuse");
    }
    // A header within the limits passes the check (and fails decoding
    // later, since the data is for 16×16): the check is on the size.
    let verdict = one(&mut client, encoded_frame("ok-size", png_claiming(64, 64))).await;
    assert_eq!(reason(&verdict), "DECODE_FAILED", "{verdict:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pixels_is_the_configured_limit() {
    let mut small = config();
    small.max_pixels = 64 * 64;
    let server = Server::start(small).await;
    let mut client = server.client().await;
    assert_judged(&one(&mut client, encoded_frame("64", pattern_png(64, 64))).await);
    let verdict = one(&mut client, encoded_frame("65", pattern_png(65, 64))).await;
    assert_refused(&verdict, "IMAGE_TOO_LARGE", "65x64");
    // Raw frames are checked against the same limit.
    let verdict = one(&mut client, raw_frame("raw", 65, 64, vec![0; 65 * 64 * 3])).await;
    assert_refused(&verdict, "IMAGE_TOO_LARGE", "65x64");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_resize_none_a_640x480_frame_is_a_size_mismatch() {
    let dir = TempDir::new("card");
    let card = std::fs::read_to_string(repo().join("models/cifar10_cnn.card.json"))
        .expect("the built-in card");
    assert!(card.contains(r#""resize": "area""#));
    let card = card.replace(r#""resize": "area""#, r#""resize": "none""#);
    let card_path = dir.join("strict.card.json");
    std::fs::write(&card_path, card).expect("write card");
    let mut strict = config();
    strict.model = ModelSource::File {
        model: repo().join("models/cifar10_cnn.onnx"),
        card: Some(card_path),
    };
    let server = Server::start(strict).await;
    let mut client = server.client().await;
    let info = client
        .get_model_info(odin_sidecar::wire::odin_v1::GetModelInfoRequest {})
        .await
        .expect("GetModelInfo")
        .into_inner();
    assert_eq!(info.preprocessing.expect("preprocessing").resize, "none");

    let verdict = one(&mut client, encoded_frame("png", pattern_png(640, 480))).await;
    assert_refused(&verdict, "SIZE_MISMATCH", "640x480");
    let verdict = one(
        &mut client,
        raw_frame("raw", 640, 480, vec![0; 640 * 480 * 3]),
    )
    .await;
    assert_refused(&verdict, "SIZE_MISMATCH", "640x480");
    // The model's own size is judged.
    assert_judged(&one(&mut client, encoded_frame("32", pattern_png(32, 32))).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_dimensions_whose_product_overflows_are_refused_not_an_internal_error() {
    let server = Server::start(config()).await;
    let mut client = server.client().await;
    // width × height × channels overflows 64 bits (found by props.rs).
    for (width, height, channels) in [(u32::MAX, u32::MAX, 3), (2_121_872_743, 2_173_403_676, 4)] {
        let frame = Frame {
            frame_id: "overflow".into(),
            image: Some(Image::Raw(odin_sidecar::wire::odin_v1::RawImage {
                width,
                height,
                channels,
                pixels: vec![0; 16],
            })),
            ..Frame::default()
        };
        let verdict = one(&mut client, frame).await;
        println!("raw {width}x{height}x{channels}: {:?}", verdict.error);
        assert_eq!(
            code(&verdict),
            INVALID_ARGUMENT,
            "a specific refusal (RAW_LENGTH_MISMATCH or IMAGE_TOO_LARGE), not {:?}",
            verdict.error
        );
    }
}
