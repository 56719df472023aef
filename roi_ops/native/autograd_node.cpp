// roi_pool's autograd node in C++, for the eager fast path (roi_ops/native/__init__.py).
//
// A Python torch.autograd.Function costs several microseconds per call in its apply and again
// in its Python backward node, more than a small CUDA call's kernel. This node does what that
// Function does (saves rois and argmax, links the output to the input's gradient edge) and
// calls one Python function for the gradient, roi_ops.autograd.gradient, so the gradient
// itself is still defined once, in Python.
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/extension.h>

#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// roi_ops.autograd.gradient, set once by set_gradient and kept for the process's lifetime (a
// node holds no Python object, so destroying one never needs the GIL).
PyObject* gradient_function = nullptr;

struct RoIPoolBackward final : Node {
  SavedVariable rois;
  SavedVariable argmax;
  std::vector<int64_t> input_shape;
  at::ScalarType input_dtype = at::kFloat;
  bool channels_last = false;
  std::string backend;

  variable_list apply(variable_list&& grads) override {
    at::Tensor grad = grads[0];
    if (!grad.defined()) {  // as a Python Function materialises it
      grad = input_metadata(0).zeros_like();
    }
    at::Tensor saved_rois = rois.unpack();
    at::Tensor saved_argmax = argmax.unpack();
    pybind11::gil_scoped_acquire gil;
    pybind11::object result;
    try {
      result = pybind11::reinterpret_borrow<pybind11::object>(gradient_function)(
          grad, saved_rois, saved_argmax, pybind11::tuple(pybind11::cast(input_shape)),
          input_dtype, channels_last, backend);
    } catch (pybind11::error_already_set& error) {
      error.restore();  // a pending Python error again, kept as PyNode keeps one
      python_error pending;
      pending.persist();
      throw std::move(pending);
    }
    return {result.is_none() ? at::Tensor() : result.cast<at::Tensor>()};
  }

  std::string name() const override { return "RoIPoolBackward"; }

  void release_variables() override {
    rois.reset_data();
    argmax.reset_data();
  }
};

// torch keeps nodes in std::shared_ptr in older releases and c10::intrusive_ptr in newer ones.
using NodePointer = decltype(std::declval<torch::autograd::Edge>().function);

template <typename Pointer = NodePointer, typename Pool = RoIPoolBackward>
Pointer new_node() {
  if constexpr (std::is_same_v<Pointer, std::shared_ptr<Node>>) {
    return std::make_shared<Pool>();
  } else {
    return c10::make_intrusive<Pool>();
  }
}

void set_gradient(pybind11::object function) {
  Py_XDECREF(gradient_function);
  gradient_function = function.release().ptr();
}

// Makes `output` (fresh, no history) the result of a RoIPoolBackward node whose input is
// `input`'s gradient edge, saving what roi_ops.autograd.gradient takes.
at::Tensor attach(const at::Tensor& input, const at::Tensor& output, const at::Tensor& rois,
                  const at::Tensor& argmax, std::vector<int64_t> input_shape,
                  at::ScalarType input_dtype, bool channels_last, std::string backend) {
  TORCH_CHECK(gradient_function != nullptr, "roi_ops native: set_gradient was not called");
  NodePointer node = new_node();
  auto* pool = static_cast<RoIPoolBackward*>(node.get());
  pool->set_next_edges(torch::autograd::collect_next_edges(input));
  pool->rois = SavedVariable(rois, false);
  pool->argmax = SavedVariable(argmax, false);
  pool->input_shape = std::move(input_shape);
  pool->input_dtype = input_dtype;
  pool->channels_last = channels_last;
  pool->backend = std::move(backend);
  torch::autograd::set_history(output, node);
  return output;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("set_gradient", &set_gradient);
  module.def("attach", &attach);
}
