// tilefuse._graph_node: one C++ autograd node whose backward is a Python function.
//
// An eager op that needs a gradient records its backward in the autograd graph. A Python
// torch.autograd.Function costs about 3 us of host time per call to do that (a Python ctx
// object, the forward call through Python, output wrapping, save_for_backward), more than a
// whole small torch op. attach() does the same recording in C++: one node per call, with the
// inputs' gradient edges, the saved tensors as SavedVariables (version checks, saved-tensor
// hooks such as torch.utils.checkpoint's, release after a backward without retain_graph, all
// as torch's own nodes do) and the Python backward called with them. See tilefuse/_graph_node.py.
//
//   attach(out, fn, state, inputs, saved) -> out
//     out:    a freshly allocated tensor that does not require grad (the op's output); its
//             grad_fn becomes the new node, output 0.
//     fn:     fn(state, saved, needs, grad_out) -> tuple with one gradient (or None) per input.
//             ``saved``: the saved tensors, unpacked; ``needs``: per input, whether this
//             backward needs its gradient (the engine's pruning included).
//     state:  any Python object, passed to fn as is.
//     inputs: tuple of tensors or None: the node's gradient edges, in fn's output order.
//     saved:  tuple of tensors or None, saved for fn.
//
// Builds against torch 2.11 (std::shared_ptr<Node>) and 2.13 (c10::intrusive_ptr<Node>).
#include <Python.h>

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/object_ptr.h>

#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

using torch::autograd::Edge;
using torch::autograd::edge_list;
using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::Variable;
using torch::autograd::variable_list;

namespace {

struct Gil {
  PyGILState_STATE state;
  Gil() : state(PyGILState_Ensure()) {}
  ~Gil() { PyGILState_Release(state); }
};

[[noreturn]] void raise_python_error() {
  python_error err;
  err.persist();
  throw std::move(err);
}

struct PyBackwardNode final : public Node {
  PyObject* fn = nullptr;     // owned
  PyObject* state = nullptr;  // owned
  std::vector<SavedVariable> saved;

  ~PyBackwardNode() override {
    if (Py_IsInitialized() && (fn || state)) {
      Gil gil;
      Py_XDECREF(fn);
      Py_XDECREF(state);
    }
  }

  std::string name() const override {
    Gil gil;
    THPObjectPtr n(fn ? PyObject_GetAttrString(fn, "__name__") : nullptr);
    if (n && PyUnicode_Check(n.get())) {
      const char* s = PyUnicode_AsUTF8(n.get());
      if (s) return s;
    }
    PyErr_Clear();
    return "TilefuseBackward";
  }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& s : saved) s.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    const size_t n_out = num_outputs();
    variable_list tensors;
    {
      // unpack before taking the GIL: an unpack hook takes it itself
      std::lock_guard<std::mutex> lock(mutex_);
      tensors.reserve(saved.size());
      for (auto& s : saved) tensors.push_back(s.unpack());
    }
    std::vector<bool> needs(n_out);
    for (size_t i = 0; i < n_out; ++i) needs[i] = task_should_compute_output(i);
    for (size_t i = 0; i < grads.size(); ++i) {
      // materialized as an autograd.Function's grads are by default
      if (!grads[i].defined()) grads[i] = input_metadata(i).zeros_like();
    }
    Gil gil;
    THPObjectPtr args(PyTuple_New(3 + static_cast<Py_ssize_t>(grads.size())));
    THPObjectPtr saved_t(PyTuple_New(static_cast<Py_ssize_t>(tensors.size())));
    THPObjectPtr needs_t(PyTuple_New(static_cast<Py_ssize_t>(n_out)));
    if (!args || !saved_t || !needs_t) raise_python_error();
    for (size_t i = 0; i < tensors.size(); ++i) {
      PyObject* t = THPVariable_Wrap(tensors[i]);  // None for an undefined tensor
      if (!t) raise_python_error();
      PyTuple_SET_ITEM(saved_t.get(), i, t);
    }
    for (size_t i = 0; i < n_out; ++i) {
      PyObject* b = needs[i] ? Py_True : Py_False;
      Py_INCREF(b);
      PyTuple_SET_ITEM(needs_t.get(), i, b);
    }
    Py_INCREF(state);
    PyTuple_SET_ITEM(args.get(), 0, state);
    PyTuple_SET_ITEM(args.get(), 1, saved_t.release());
    PyTuple_SET_ITEM(args.get(), 2, needs_t.release());
    for (size_t i = 0; i < grads.size(); ++i) {
      PyObject* g = THPVariable_Wrap(grads[i]);
      if (!g) raise_python_error();
      PyTuple_SET_ITEM(args.get(), 3 + i, g);
    }
    THPObjectPtr res(PyObject_Call(fn, args.get(), nullptr));
    if (!res) raise_python_error();
    if (!PyTuple_Check(res.get()) ||
        static_cast<size_t>(PyTuple_GET_SIZE(res.get())) != n_out) {
      PyErr_Format(PyExc_TypeError,
                   "tilefuse: a backward returned %R, expected a tuple of %zd gradients",
                   res.get(), static_cast<Py_ssize_t>(n_out));
      raise_python_error();
    }
    variable_list out(n_out);
    for (size_t i = 0; i < n_out; ++i) {
      PyObject* o = PyTuple_GET_ITEM(res.get(), i);
      if (o == Py_None) continue;
      if (!THPVariable_Check(o)) {
        PyErr_Format(PyExc_TypeError, "tilefuse: a backward returned %R as gradient %zd", o,
                     static_cast<Py_ssize_t>(i));
        raise_python_error();
      }
      out[i] = THPVariable_Unpack(o);
    }
    return out;
  }
};

// The node pointer type of this torch: what Node::getptr() returns.
using NodePtr = decltype(std::declval<Node&>().getptr());
constexpr bool kIntrusive = !std::is_same_v<NodePtr, std::shared_ptr<Node>>;

template <typename T, bool intrusive = kIntrusive>
auto make_node() {
  if constexpr (intrusive) {
    return c10::make_intrusive<T>();
  } else {
    // torch's deleter (found by argument-dependent lookup: torch::autograd::deleteNode)
    // frees long chains of nodes without deep recursion
    return std::shared_ptr<T>(new T(), [](T* node) { deleteNode(node); });
  }
}

PyObject* attach(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5 || !THPVariable_Check(args[0]) || !PyTuple_Check(args[3]) ||
      !PyTuple_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError,
                    "attach(out: Tensor, fn, state, inputs: tuple, saved: tuple)");
    return nullptr;
  }
  PyObject* out_obj = args[0];
  PyObject* inputs = args[3];
  PyObject* saved = args[4];
  const Variable& out = THPVariable_Unpack(out_obj);
  if (out.requires_grad() || out.is_view()) {
    PyErr_SetString(PyExc_ValueError,
                    "attach: out must be a new tensor that does not require grad");
    return nullptr;
  }
  const Py_ssize_t n_in = PyTuple_GET_SIZE(inputs);
  const Py_ssize_t n_saved = PyTuple_GET_SIZE(saved);
  for (Py_ssize_t i = 0; i < n_in; ++i) {
    PyObject* o = PyTuple_GET_ITEM(inputs, i);
    if (o != Py_None && !THPVariable_Check(o)) {
      PyErr_Format(PyExc_TypeError, "attach: inputs[%zd] is %R, not a tensor or None", i, o);
      return nullptr;
    }
  }
  for (Py_ssize_t i = 0; i < n_saved; ++i) {
    PyObject* o = PyTuple_GET_ITEM(saved, i);
    if (o != Py_None && !THPVariable_Check(o)) {
      PyErr_Format(PyExc_TypeError, "attach: saved[%zd] is %R, not a tensor or None", i, o);
      return nullptr;
    }
  }
  auto node = make_node<PyBackwardNode>();
  edge_list edges;
  edges.reserve(n_in);
  for (Py_ssize_t i = 0; i < n_in; ++i) {
    PyObject* o = PyTuple_GET_ITEM(inputs, i);
    if (o == Py_None) {
      edges.emplace_back();
    } else {
      const Variable& v = THPVariable_Unpack(o);
      edges.emplace_back(v.requires_grad() ? torch::autograd::impl::gradient_edge(v) : Edge());
    }
  }
  node->set_next_edges(std::move(edges));
  node->saved.reserve(n_saved);
  for (Py_ssize_t i = 0; i < n_saved; ++i) {
    PyObject* o = PyTuple_GET_ITEM(saved, i);
    if (o == Py_None) {
      node->saved.emplace_back();
    } else {
      node->saved.emplace_back(THPVariable_Unpack(o), /*is_output=*/false);
    }
  }
  Py_INCREF(args[1]);
  node->fn = args[1];
  Py_INCREF(args[2]);
  node->state = args[2];
  torch::autograd::set_history(out, node);
  Py_INCREF(out_obj);
  return out_obj;
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"attach", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(attach)),
     METH_FASTCALL, "attach(out, fn, state, inputs, saved) -> out"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_graph_node", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__graph_node() { return PyModule_Create(&module_def); }
