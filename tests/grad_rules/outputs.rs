//! What the derived graph returns besides the gradient: logits taken
//! before a trailing Softmax, `perturbed` with sign(0) = +1 and a
//! per-channel std, a refused std, images of a batch kept apart, and a
//! pinned batch size kept.

use odin_sidecar::grad::{derive, names, GradError, GradOptions};
use odin_sidecar::onnx::{tensor_proto::DataType, ModelProto};
use prost::Message;

use crate::common::*;
use crate::harness::*;

#[test]
fn trailing_softmax_is_skipped_and_reported() {
    let body = |_| {
        vec![
            n(
                "Conv",
                &["x", "w"],
                &["c"],
                vec![ais("pads", &[1, 1, 1, 1])],
            ),
            n("Relu", &["c"], &["f"], vec![]),
        ]
    };
    let plain_case = Case::new("sm", &[2, 3, 5, 5], body).w("w", &[2, 3, 3, 3], 0.5);
    let x = input(&plain_case);
    let dt = DataType::Float as i32;
    let plain = build(&plain_case, dt, &x).unwrap();
    // The same network with a Softmax appended after the logits.
    let mut m = ModelProto::decode(plain.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.node
        .push(n("Softmax", &["z"], &["probs"], vec![ai("axis", 1)]));
    g.output[0].name = Some("probs".into());
    let with_softmax = m.encode_to_vec();
    let opts = GradOptions {
        std: vec![1.0],
        raw_gradient: true,
        ..Default::default()
    };
    let a = derive(&plain, &opts).unwrap();
    let b = derive(&with_softmax, &opts).unwrap();
    assert!(a.summary.notes.is_empty());
    assert!(
        b.summary.notes.iter().any(|n| n.contains("Softmax")),
        "{:?}",
        b.summary.notes
    );
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let run_g = |bytes: &[u8]| {
        let mut s = try_session(bytes).unwrap();
        let (gi, li) = (
            output_index(&s, names::GRADIENT),
            output_index(&s, names::LOGITS),
        );
        let o = run::<f32>(
            &mut s,
            "x",
            &[2, 3, 5, 5],
            &xf,
            &[("temperature", 2.0), ("epsilon", 0.01)],
        );
        (o[gi].clone(), o[li].clone())
    };
    let (ga, la) = run_g(&a.bytes);
    let (gb, lb) = run_g(&b.bytes);
    assert_eq!(la, lb, "logits are the pre-softmax values");
    assert_eq!(ga, gb, "the gradient starts from the pre-softmax logits");
    assert!(ga.iter().any(|v| *v != 0.0));
}

#[test]
fn perturbed_uses_sign_with_zero_as_plus_and_per_channel_std() {
    // The slice drops every other column: those pixels get a zero gradient,
    // whose sign must count as +1.
    let case = Case::new("perturb", &[2, 3, 4, 4], |_| {
        vec![n("Slice", &["x", "st", "en", "ax", "sp"], &["f"], vec![])]
    })
    .ints("st", &[0])
    .ints("en", &[i64::MAX])
    .ints("ax", &[3])
    .ints("sp", &[2]);
    let std = [0.5f32, 0.25, 2.0];
    let x = input(&case);
    let plain = build(&case, DataType::Float as i32, &x).unwrap();
    let d = derive(
        &plain,
        &GradOptions {
            std: std.to_vec(),
            raw_gradient: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut s = try_session(&d.bytes).unwrap();
    let (gi, pi) = (
        output_index(&s, names::GRADIENT),
        output_index(&s, names::PERTURBED),
    );
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let eps = 0.01f32;
    let o = run::<f32>(
        &mut s,
        "x",
        &[2, 3, 4, 4],
        &xf,
        &[("temperature", 1.0), ("epsilon", eps)],
    );
    let (mut zeros, mut neg) = (0, 0);
    for (i, (&xv, (&g, &p))) in xf.iter().zip(o[gi].iter().zip(&o[pi])).enumerate() {
        let c = (i / 16) % 3;
        let sign = if g >= 0.0 { 1.0f32 } else { -1.0 };
        zeros += usize::from(g == 0.0);
        neg += usize::from(g < 0.0);
        let want = xv - eps * (sign / std[c]);
        assert_eq!(p as f32, want, "element {i}: g = {g}");
    }
    assert_eq!(
        zeros,
        xf.len() / 2,
        "the dropped columns have zero gradient"
    );
    assert!(neg > 0);
}

#[test]
fn bad_std_is_rejected() {
    let case = Case::new("std", &[2, 3, 4], |_| {
        vec![n("Relu", &["x"], &["f"], vec![])]
    });
    for std in [vec![1.0, 2.0], vec![0.0], vec![]] {
        let e = derive_case(
            &case,
            DataType::Float as i32,
            &GradOptions {
                std: std.clone(),
                raw_gradient: false,
                ..Default::default()
            },
        );
        assert!(matches!(e, Err(GradError::Std(_))), "{std:?}: {e:?}");
    }
}

#[test]
fn images_in_a_batch_do_not_mix() {
    // Gradient of image 0 is the same alone and next to another image.
    let case = Case::new("batch", &[2, 3, 6, 6], |_| {
        vec![
            n(
                "Conv",
                &["x", "w"],
                &["c"],
                vec![ais("pads", &[1, 1, 1, 1]), ais("strides", &[2, 2])],
            ),
            n("Relu", &["c"], &["r"], vec![]),
            n("GlobalAveragePool", &["r"], &["f"], vec![]),
        ]
    })
    .w("w", &[4, 3, 3, 3], 0.5);
    let x = input(&case);
    let plain = build(&case, DataType::Float as i32, &x).unwrap();
    let d = derive(
        &plain,
        &GradOptions {
            std: vec![1.0],
            raw_gradient: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut s = try_session(&d.bytes).unwrap();
    let gi = output_index(&s, names::GRADIENT);
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let both = run::<f32>(
        &mut s,
        "x",
        &[2, 3, 6, 6],
        &xf,
        &[("temperature", 1.0), ("epsilon", 0.0)],
    );
    let one = run::<f32>(
        &mut s,
        "x",
        &[1, 3, 6, 6],
        &xf[..108],
        &[("temperature", 1.0), ("epsilon", 0.0)],
    );
    assert_eq!(&both[gi][..108], &one[gi][..]);
}

#[test]
fn a_fixed_batch_size_is_kept() {
    // Exports often pin the batch to 1; the derived graph keeps that size.
    let case = Case::new("fixed", &[1, 3, 5, 5], |_| {
        vec![
            n(
                "Conv",
                &["x", "w"],
                &["c"],
                vec![ais("pads", &[1, 1, 1, 1]), ais("strides", &[2, 2])],
            ),
            n("Relu", &["c"], &["f"], vec![]),
        ]
    })
    .w("w", &[2, 3, 3, 3], 0.5);
    let x = input(&case);
    let dt = DataType::Float as i32;
    let plain = build(&case, dt, &x).unwrap();
    let mut m = ModelProto::decode(plain.as_slice()).unwrap();
    let g = m.graph.as_mut().unwrap();
    g.input[0].r#type = Some(tensor_type(dt, &[Some(1), Some(3), Some(5), Some(5)]));
    let pinned = m.encode_to_vec();
    let opts = GradOptions {
        std: vec![1.0],
        raw_gradient: true,
        ..Default::default()
    };
    let a = derive(&plain, &opts).unwrap();
    let b = derive(&pinned, &opts).unwrap();
    let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let grad = |bytes: &[u8]| {
        let mut s = try_session(bytes).unwrap();
        let gi = output_index(&s, names::GRADIENT);
        run::<f32>(
            &mut s,
            "x",
            &[1, 3, 5, 5],
            &xf,
            &[("temperature", 1.0), ("epsilon", 0.0)],
        )[gi]
            .clone()
    };
    let (ga, gb) = (grad(&a.bytes), grad(&b.bytes));
    assert!(ga.iter().any(|v| *v != 0.0));
    assert_eq!(ga, gb);
}
