//! Each fast path's two forms: on a plain ndarray backend the kernel alone,
//! on `Autodiff` of one the kernel registered as a graph node whose backward
//! step (also a kernel) Burn calls with the output's gradient.

use super::elementwise::{reshaped, unary_backward, unary_forward, Saves, Unary};
use super::gemm::Bilinear;
use super::{from_primitive, into_primitive, FastPath, NdBackend};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorMetadata};
use burn_ndarray::NdArrayTensor;
use std::marker::PhantomData;

/// A product of `a` (rank `DA`, the output's rank) and `b` (rank `DB`).
pub(super) struct BilinearOp<K, const DA: usize, const DB: usize>(pub K);

impl<B: Backend, K: Bilinear, const DA: usize, const DB: usize> FastPath<B> for BilinearOp<K, DA, DB> {
    type Input = (Tensor<B, DA>, Tensor<B, DB>);
    type Output = Tensor<B, DA>;

    fn plain<NB: NdBackend>(self, (a, b): Self::Input) -> Result<Self::Output, Self::Input> {
        let (ap, bp) = (
            into_primitive::<B, NB, DA>(a.clone()),
            into_primitive::<B, NB, DB>(b.clone()),
        );
        match self.0.forward(&ap, &bp) {
            Some(out) => Ok(from_primitive::<B, NB, DA>(out)),
            None => Err((a, b)),
        }
    }

    fn tracked<NB: NdBackend>(self, (a, b): Self::Input) -> Result<Self::Output, Self::Input> {
        let (ap, bp) = (
            into_primitive::<B, Autodiff<NB>, DA>(a.clone()),
            into_primitive::<B, Autodiff<NB>, DB>(b.clone()),
        );
        let Some(out) = self.0.forward(&ap.primitive, &bp.primitive) else {
            return Err((a, b));
        };
        let out = match BilinearBackward(self.0)
            .prepare::<NoCheckpointing>([ap.node.clone(), bp.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                // a is needed for b's gradient only, and b for a's.
                let a_state = bp.is_tracked().then(|| prep.checkpoint(&ap));
                let b_state = ap.is_tracked().then(|| prep.checkpoint(&bp));
                prep.finish((a_state, b_state), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Ok(from_primitive::<B, Autodiff<NB>, DA>(out))
    }
}

/// The backward step of [`BilinearOp`].
#[derive(Debug)]
struct BilinearBackward<K>(K);

impl<NB: NdBackend, K: Bilinear> Backward<NB, 2> for BilinearBackward<K> {
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let grad = grads.consume::<NB>(&ops.node);
        let (a_state, b_state) = ops.state;
        // The gradient has the output's element type, which is the operands'.
        if let Some(node) = node_a {
            let b: NdArrayTensor = checkpointer.retrieve_node_output(b_state.expect("b is kept when a is tracked"));
            grads.register::<NB>(
                node.id,
                self.0.grad_a(&grad, &b).expect("operands and gradient of one dtype"),
            );
        }
        if let Some(node) = node_b {
            let a: NdArrayTensor = checkpointer.retrieve_node_output(a_state.expect("a is kept when b is tracked"));
            grads.register::<NB>(
                node.id,
                self.0.grad_b(&a, &grad).expect("operands and gradient of one dtype"),
            );
        }
    }
}

/// A [`Unary`] kernel on a rank-`D` tensor, built by `F` once the path is
/// taken.
pub(super) struct UnaryOp<K, F, const D: usize>(F, PhantomData<K>);

impl<K, F, const D: usize> UnaryOp<K, F, D> {
    pub fn new(kernel: F) -> Self {
        Self(kernel, PhantomData)
    }
}

impl<B: Backend, K: Unary, F: FnOnce() -> K, const D: usize> FastPath<B> for UnaryOp<K, F, D> {
    type Input = Tensor<B, D>;
    type Output = Tensor<B, D>;

    fn plain<NB: NdBackend>(self, x: Self::Input) -> Result<Self::Output, Self::Input> {
        let xp = into_primitive::<B, NB, D>(x.clone());
        match unary_forward(&(self.0)(), &xp, false) {
            Some((out, _)) => Ok(from_primitive::<B, NB, D>(out)),
            None => Err(x),
        }
    }

    fn tracked<NB: NdBackend>(self, x: Self::Input) -> Result<Self::Output, Self::Input> {
        let kernel = (self.0)();
        let xp = into_primitive::<B, Autodiff<NB>, D>(x.clone());
        let save = kernel.saves() != Saves::Nothing && xp.is_tracked();
        let Some((out, saved)) = unary_forward(&kernel, &xp.primitive, save) else {
            return Err(x);
        };
        let out = match UnaryBackward(kernel)
            .prepare::<NoCheckpointing>([xp.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(saved, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Ok(from_primitive::<B, Autodiff<NB>, D>(out))
    }
}

/// The backward step of [`UnaryOp`]; its state is what the kernel saved.
#[derive(Debug)]
struct UnaryBackward<K>(K);

impl<NB: NdBackend, K: Unary> Backward<NB, 1> for UnaryBackward<K> {
    type State = Option<NdArrayTensor>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<NB>(&ops.node);
        if let Some(node) = node {
            let dx = unary_backward(&self.0, ops.state.as_ref(), &grad).expect("the gradient has the forward's dtype");
            grads.register::<NB>(node.id, dx);
        }
    }
}

/// A reshape of a rank-`D1` tensor to `shape`.
pub(super) struct ReshapeOp<const D1: usize, const D2: usize>(pub [usize; D2]);

impl<B: Backend, const D1: usize, const D2: usize> FastPath<B> for ReshapeOp<D1, D2> {
    type Input = Tensor<B, D1>;
    type Output = Tensor<B, D2>;

    fn plain<NB: NdBackend>(self, x: Self::Input) -> Result<Self::Output, Self::Input> {
        match reshaped(into_primitive::<B, NB, D1>(x.clone()), &self.0) {
            Some(out) => Ok(from_primitive::<B, NB, D2>(out)),
            None => Err(x),
        }
    }

    fn tracked<NB: NdBackend>(self, x: Self::Input) -> Result<Self::Output, Self::Input> {
        let xp = into_primitive::<B, Autodiff<NB>, D1>(x.clone());
        let input_shape = xp.primitive.shape().to_vec();
        let Some(out) = reshaped(xp.primitive.clone(), &self.0) else {
            return Err(x);
        };
        let out = match ReshapeBackward
            .prepare::<NoCheckpointing>([xp.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(input_shape, out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        Ok(from_primitive::<B, Autodiff<NB>, D2>(out))
    }
}

/// The backward step of [`ReshapeOp`]: the gradient reshaped back.
#[derive(Debug)]
struct ReshapeBackward;

impl<NB: NdBackend> Backward<NB, 1> for ReshapeBackward {
    type State = Vec<usize>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let grad = grads.consume::<NB>(&ops.node);
        if let Some(node) = node {
            let dx = match reshaped(grad.clone(), &ops.state) {
                Some(dx) => dx,
                None => NB::float_reshape(grad, ops.state.into()),
            };
            grads.register::<NB>(node.id, dx);
        }
    }
}
