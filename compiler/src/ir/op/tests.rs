use super::*;

#[test]
fn text_round_trips() {
    let ops = vec![
        Op::Input {
            name: "x".into(),
            shape: vec![784, 100],
        },
        Op::Param {
            name: "layers.0.weight".into(),
            shape: vec![784, 784],
        },
        Op::constant(-0.5),
        Op::constant(1e-6),
        Op::MatMul,
        Op::Sum { axis: Some(0) },
        Op::Broadcast {
            to: vec![3, 4],
            new_axis: Some(1),
        },
        Op::Broadcast {
            to: vec![],
            new_axis: None,
        },
        Op::Unary(Unary::Softplus),
        Op::StopGrad,
        Op::Reshape {
            to: vec![2, 28, 28],
        },
        Op::Permute {
            perm: vec![0, 2, 4, 1, 3, 5],
        },
        Op::Take { axis: 1, index: 0 },
        Op::Embed {
            axis: 0,
            index: 1,
            size: 2,
        },
        Op::Unary(Unary::Relu),
        Op::Unary(Unary::Step),
        Op::Unary(Unary::Tanh),
        Op::ReduceSum {
            axes: vec![0, 1, 2],
        },
        Op::Expand {
            to: vec![4, 14, 14, 100],
            axes: vec![1, 2, 3],
        },
        Op::Conv2d,
        Op::FlipKernel,
        Op::ConvKernelGrad { k: 3 },
        Op::Toeplitz { h: 28, w: 27 },
        Op::ToeplitzAdjoint { h: 7, w: 7, k: 5 },
        Op::Multiplicity { h: 28, w: 28 },
        Op::Spline {
            bins: 5,
            bound: 10f64.to_bits(),
            part: SplinePart::LogDet,
        },
        Op::Spline {
            bins: 4,
            bound: 2.5f64.to_bits(),
            part: SplinePart::Inverse,
        },
        Op::SplineGrad {
            bins: 5,
            bound: 3.5f64.to_bits(),
            part: SplinePart::Value,
            wrt: 3,
        },
    ];
    for op in ops {
        assert_eq!(op.to_string().parse::<Op>(), Ok(op.clone()), "{op}");
    }
    assert!("frobnicate".parse::<Op>().is_err());
}

#[test]
fn shapes() {
    assert_eq!(
        Op::MatMul.infer_shape(&[vec![3, 4], vec![4, 5]]),
        Ok(vec![3, 5])
    );
    assert!(Op::MatMul.infer_shape(&[vec![3, 4], vec![5, 4]]).is_err());
    assert_eq!(Op::Add.infer_shape(&[vec![], vec![2, 3]]), Ok(vec![2, 3]));
    assert!(Op::Add.infer_shape(&[vec![3], vec![2, 3]]).is_err());
    assert_eq!(
        Op::Sum { axis: Some(0) }.infer_shape(&[vec![7, 9]]),
        Ok(vec![9])
    );
    let b = Op::Broadcast {
        to: vec![7, 9],
        new_axis: Some(1),
    };
    assert_eq!(b.infer_shape(&[vec![7]]), Ok(vec![7, 9]));
    assert!(b.infer_shape(&[vec![9]]).is_err());
    assert!(Op::LogDet.infer_shape(&[vec![2, 3]]).is_err());
}

#[test]
fn every_function_is_its_name() {
    assert_eq!(
        Unary::ALL.len(),
        9 + usize::from(cfg!(feature = "example-op"))
    );
    for u in Unary::ALL {
        assert_eq!(u.name().parse::<Op>(), Ok(Op::Unary(*u)));
    }
}
