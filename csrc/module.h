// The extension's Python module: helpers of fusedconv's Python code that
// compute exactly what it computes, faster, and direct entries to the CPU
// kernels (the ops of the backends are registered with torch by ops.cpp, cpu/
// and cuda/, not here).
#pragma once

#include <Python.h>

#include <utility>

namespace fusedconv {

// An owned reference, released on scope exit.
class Ref {
 public:
  Ref() = default;
  explicit Ref(PyObject* object) : object_(object) {}  // steals
  Ref(const Ref&) = delete;
  Ref& operator=(const Ref&) = delete;
  Ref(Ref&& other) noexcept : object_(other.object_) { other.object_ = nullptr; }
  Ref& operator=(Ref&& other) noexcept {
    std::swap(object_, other.object_);
    return *this;
  }
  ~Ref() { Py_XDECREF(object_); }
  static Ref borrowed(PyObject* object) {
    Py_XINCREF(object);
    return Ref(object);
  }
  PyObject* get() const { return object_; }
  explicit operator bool() const { return object_ != nullptr; }

 private:
  PyObject* object_ = nullptr;
};

// walk_modules(walk, model, blocks, converter_of, state, plain): walk.cpp
PyObject* walk_modules(PyObject* self, PyObject* args);

// bn_affines(means, variances, gammas, betas, eps): affines.cpp
PyObject* bn_affines(PyObject* self, PyObject* args);

// folded_biases(scales, shifts, biases, extras, dtype): affines.cpp
PyObject* folded_biases(PyObject* self, PyObject* args);

// rescale_in_place(weights, row_scales, col_scales, groups): cpu/rescale.cpp
PyObject* rescale_in_place(PyObject* self, PyObject* args);

// pad_add_in_place(bigs, smalls, scales, offsets, dilations): cpu/pad_add.cpp
PyObject* pad_add_in_place(PyObject* self, PyObject* args);

}  // namespace fusedconv
