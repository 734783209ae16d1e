// The module-tree walk of fusedconv/model_index.py (_Walk), in C.
//
// A fold's first step walks every module of the model and looks at its
// attributes, hooks and tensors; in Python that costs several microseconds a
// module, which on a network of a few hundred small modules is a third of a
// fold. This is the same walk: the same order (depth first, parents before
// children, registration order), the same lists filled, the same blocks found,
// with the Python one (_Walk._walk) kept as its reference and its fallback.
//
// Only the common module is looked at here: no forward hooks, registries that
// are plain dicts, exact Tensor/Parameter values without attributes of their
// own, and nothing in the instance dict but nn.Module's bookkeeping and plain
// configuration (numbers, strings, None, tuples of them). Every other module is
// handed to _Walk._look_at, the Python look, so that what is subtle (hooks,
// FSDP2's state, tensors in attributes) has one implementation. For the plain
// registered tensors it also reads the bytes each spans, as memory.memory_span
// does; a tensor whose span that function would not give (no storage, meta,
// empty, another layout) is left to memory.sharing_memory in Python.
#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/python_variable.h>

#include "module.h"

#include <algorithm>
#include <cstdlib>
#include <utility>
#include <vector>

namespace fusedconv {
namespace {

// Interned attribute names, made once.
struct Names {
  PyObject* modules;
  PyObject* parameters;
  PyObject* buffers;
  PyObject* forward_hooks;
  PyObject* forward_pre_hooks;
  PyObject* dict;
  PyObject* look_at;
  PyObject* items;
  PyObject* dot;
  PyObject* empty;
  PyObject* getattribute;
};

Names* names() {
  static Names* made = [] {
    auto* n = new Names;
    n->modules = PyUnicode_InternFromString("_modules");
    n->parameters = PyUnicode_InternFromString("_parameters");
    n->buffers = PyUnicode_InternFromString("_buffers");
    n->forward_hooks = PyUnicode_InternFromString("_forward_hooks");
    n->forward_pre_hooks = PyUnicode_InternFromString("_forward_pre_hooks");
    n->dict = PyUnicode_InternFromString("__dict__");
    n->look_at = PyUnicode_InternFromString("_look_at");
    n->items = PyUnicode_InternFromString("items");
    n->dot = PyUnicode_InternFromString(".");
    n->empty = PyUnicode_InternFromString("");
    n->getattribute = PyUnicode_InternFromString("__getattribute__");
    return n;
  }();
  return made;
}

// What the walk is given and fills: the _Walk's own lists and dicts.
struct Walk {
  PyObject* paths;       // dict: id(module) -> [path, ...]
  PyObject* by_path;     // dict: path -> module
  PyObject* modules;     // list of (path, module), first paths
  PyObject* values;      // list: each first module's attribute values
  PyObject* registered;  // list of (path, tensor)
  PyObject* unspanned;   // list of (path, tensor) whose span is left to Python
  PyObject* spans;       // list of (start, end, path)
  PyObject* found;       // list of (path, block, converter)
  PyObject* members;     // dict: block path -> [module, ...]
  PyObject* outside;     // list of (path, module)
  PyObject* look_at;     // the Python look, bound to the _Walk
  PyObject* state;       // frozenset: nn.Module's bookkeeping names
  PyObject* plain;       // frozenset: the plain configuration types
};

bool plain_type(const Walk& walk, PyObject* value, int* error) {
  int found = PySet_Contains(walk.plain, reinterpret_cast<PyObject*>(Py_TYPE(value)));
  if (found < 0) *error = 1;
  return found == 1;
}

// ``getattr(module, name)``, read from the instance dict ``attributes`` where
// the ordinary lookup would find it there: the class keeps object's
// __getattribute__ and holds nothing of that name (a descriptor would come
// first). One dict read instead of the lookup through nn.Module's
// __getattr__ hook, six times a module.
PyObject* attribute(PyObject* module, PyObject* attributes, PyObject* name) {
  static PyObject* object_getattribute = _PyType_Lookup(&PyBaseObject_Type, names()->getattribute);
  PyTypeObject* type = Py_TYPE(module);
  if (_PyType_Lookup(type, names()->getattribute) == object_getattribute && _PyType_Lookup(type, name) == nullptr) {
    PyObject* value = PyDict_GetItemWithError(attributes, name);
    if (value) {
      Py_INCREF(value);
      return value;
    }
    if (PyErr_Occurred()) return nullptr;
  }
  return PyObject_GetAttr(module, name);  // not there: nn.Module's __getattr__ says what it is
}

// The module's instance dict when vars(module) returns it (no class redefines
// __dict__), as a plain dict; else null, with an exception set only where
// looking raised one that is not about the attribute.
PyObject* instance_dict(PyObject* module) {
  Ref real(PyObject_GenericGetDict(module, nullptr));
  if (!real) {
    if (PyErr_ExceptionMatches(PyExc_AttributeError) || PyErr_ExceptionMatches(PyExc_TypeError)) PyErr_Clear();
    return nullptr;
  }
  Ref seen(PyObject_GetAttr(module, names()->dict));  // what vars(module) gives
  if (!seen) {
    if (PyErr_ExceptionMatches(PyExc_AttributeError) || PyErr_ExceptionMatches(PyExc_TypeError)) PyErr_Clear();
    return nullptr;
  }
  if (seen.get() != real.get() || !PyDict_CheckExact(real.get())) return nullptr;
  Py_INCREF(real.get());
  return real.get();
}

// Whether a truthy attribute: -1 on error.
int truthy_attribute(PyObject* module, PyObject* attributes, PyObject* name) {
  Ref value(attribute(module, attributes, name));
  if (!value) return -1;
  return PyObject_IsTrue(value.get());
}

// Whether the module is the common one that this file looks at by itself
// (see the top of the file): 1 yes, 0 no (the Python look takes it), -1 error.
// ``attributes``: its instance dict; ``registries`` receives its _parameters and
// _buffers dicts.
int plain_module(const Walk& walk, PyObject* module, PyObject* attributes, Ref* registries) {
  Names* n = names();
  for (PyObject* hooks : {n->forward_hooks, n->forward_pre_hooks}) {
    int hooked = truthy_attribute(module, attributes, hooks);
    if (hooked != 0) return hooked < 0 ? -1 : 0;
  }
  PyObject* registry_names[2] = {n->parameters, n->buffers};
  for (int i = 0; i < 2; ++i) {
    registries[i] = Ref(attribute(module, attributes, registry_names[i]));
    if (!registries[i]) return -1;
    if (!PyDict_CheckExact(registries[i].get())) return 0;
    Py_ssize_t position = 0;
    PyObject *key, *tensor;
    while (PyDict_Next(registries[i].get(), &position, &key, &tensor)) {
      if (tensor == Py_None) continue;
      if (!THPVariable_CheckExact(tensor)) return 0;  // exactly a Tensor or a Parameter
      Ref attributes(PyObject_GetAttr(tensor, n->dict));
      if (!attributes) return -1;
      int any = PyObject_IsTrue(attributes.get());
      if (any != 0) return any < 0 ? -1 : 0;  // a tensor's own attributes: the Python look follows them
    }
  }
  Py_ssize_t position = 0;
  PyObject *key, *value;
  int error = 0;
  while (PyDict_Next(attributes, &position, &key, &value)) {
    if (!PyUnicode_CheckExact(key)) return 0;  // its hash would run Python code amid the iteration
    int own = PySet_Contains(walk.state, key);
    if (own < 0) return -1;
    // Held while it is looked at: a metaclass's __hash__ may run Python code that changes the dict.
    Ref held = Ref::borrowed(value);
    if (own || plain_type(walk, value, &error)) continue;
    if (error) return -1;
    if (!PyTuple_CheckExact(value)) return 0;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(value); ++i) {
      if (!plain_type(walk, PyTuple_GET_ITEM(value, i), &error)) return error ? -1 : 0;
    }
  }
  return 1;
}

// The bytes [start, end) a plain tensor reads, as memory.memory_span gives
// them; false where that function gives None (the tensor is then left to it).
bool memory_span(PyObject* object, long long* start, long long* end) {
  try {
    const at::Tensor& tensor = THPVariable_Unpack(object);
    if (tensor.layout() != at::kStrided || tensor.is_meta() || !tensor.has_storage()) return false;
    auto address = reinterpret_cast<long long>(tensor.data_ptr());
    if (address == 0 || tensor.numel() == 0) return false;
    long long extent = 1;
    if (tensor.is_contiguous()) {
      extent = static_cast<long long>(tensor.nbytes());
    } else {
      auto sizes = tensor.sizes();
      auto strides = tensor.strides();
      for (size_t d = 0; d < sizes.size(); ++d) extent += (sizes[d] - 1) * std::llabs(strides[d]);
      extent *= static_cast<long long>(tensor.element_size());
    }
    *start = address;
    *end = address + extent;
    return true;
  } catch (const std::exception&) {  // symbolic sizes, a wrapper without data: Python decides
    return false;
  }
}

int append_pair(PyObject* list, PyObject* first, PyObject* second) {
  Ref pair(PyTuple_Pack(2, first, second));
  return pair ? PyList_Append(list, pair.get()) : -1;
}

// _Walk._look_at for a plain module: no attribute values, its registered
// tensors (parameters, then buffers) with their spans.
int look_at_plain(const Walk& walk, PyObject* path, Ref* registries) {
  Ref no_values(PyList_New(0));
  if (!no_values || PyList_Append(walk.values, no_values.get()) < 0) return -1;
  for (int i = 0; i < 2; ++i) {
    Py_ssize_t position = 0;
    PyObject *key, *tensor;
    while (PyDict_Next(registries[i].get(), &position, &key, &tensor)) {
      if (tensor == Py_None) continue;
      if (append_pair(walk.registered, path, tensor) < 0) return -1;
      long long start, end;
      if (!memory_span(tensor, &start, &end)) {
        if (append_pair(walk.unspanned, path, tensor) < 0) return -1;
        continue;
      }
      Ref span(Py_BuildValue("(LLO)", start, end, path));
      if (!span || PyList_Append(walk.spans, span.get()) < 0) return -1;
    }
  }
  return 0;
}

int look_at(const Walk& walk, PyObject* path, PyObject* module, PyObject* attributes) {
  Ref registries[2];
  int plain = attributes ? plain_module(walk, module, attributes, registries) : 0;
  if (plain < 0) return -1;
  if (plain) return look_at_plain(walk, path, registries);
  Ref done(PyObject_CallFunctionObjArgs(walk.look_at, path, module, nullptr));
  return done ? 0 : -1;
}

// Push the children of ``module`` (registered at ``path``) in reverse, so that
// popping visits them in registration order.
int push_children(std::vector<std::pair<Ref, Ref>>* stack, PyObject* path, PyObject* module, PyObject* attributes) {
  Names* n = names();
  Ref children(attributes ? attribute(module, attributes, n->modules) : PyObject_GetAttr(module, n->modules));
  if (!children) return -1;
  int any = PyObject_IsTrue(children.get());
  if (any <= 0) return any;
  Ref below;
  if (PyUnicode_GET_LENGTH(path) == 0) {
    below = Ref::borrowed(n->empty);
  } else {
    below = Ref(PyUnicode_Concat(path, n->dot));
    if (!below) return -1;
  }
  Ref items;
  if (PyDict_CheckExact(children.get())) {
    items = Ref(PyDict_Items(children.get()));
  } else {
    Ref view(PyObject_CallMethodNoArgs(children.get(), n->items));
    if (!view) return -1;
    items = Ref(PySequence_List(view.get()));
  }
  if (!items) return -1;
  size_t first = stack->size();
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(items.get()); ++i) {
    PyObject* item = PyList_GET_ITEM(items.get(), i);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
      PyErr_SetString(PyExc_TypeError, "a module's _modules.items() gave something other than pairs");
      return -1;
    }
    PyObject* child = PyTuple_GET_ITEM(item, 1);
    if (child == Py_None) continue;
    Ref child_path(PyNumber_Add(below.get(), PyTuple_GET_ITEM(item, 0)));
    if (!child_path) return -1;
    if (!PyUnicode_Check(child_path.get())) {
      PyErr_SetString(PyExc_TypeError, "a module's child is registered under a name that is not a string");
      return -1;
    }
    stack->emplace_back(std::move(child_path), Ref::borrowed(child));
  }
  std::reverse(stack->begin() + static_cast<std::ptrdiff_t>(first), stack->end());
  return 0;
}

// The walk of _Walk._walk, step for step.
int walk_tree(const Walk& walk, PyObject* model, PyObject* blocks, PyObject* converter_of) {
  Names* n = names();
  std::vector<std::pair<Ref, Ref>> stack;
  stack.emplace_back(Ref::borrowed(n->empty), Ref::borrowed(model));
  Ref prefix, current, seen;  // the block being walked: its insides' prefix, modules, their ids
  while (!stack.empty()) {
    Ref path = std::move(stack.back().first);
    Ref module = std::move(stack.back().second);
    stack.pop_back();
    if (PyDict_SetItem(walk.by_path, path.get(), module.get()) < 0) return -1;
    // The instance dict, read directly where vars(module) is that very dict (a
    // class may define __dict__ otherwise); else every attribute is looked up
    // as usual, and the module goes to the Python look.
    Ref attributes(instance_dict(module.get()));
    if (!attributes && PyErr_Occurred()) return -1;
    PyObject* plain_dict = attributes ? attributes.get() : nullptr;
    if (push_children(&stack, path.get(), module.get(), plain_dict) < 0) return -1;
    Ref id(PyLong_FromVoidPtr(module.get()));
    if (!id) return -1;
    bool inside = false;
    if (prefix) {
      if (PyUnicode_GET_LENGTH(prefix.get()) == 0) {
        inside = true;
      } else {
        Py_ssize_t match = PyUnicode_Tailmatch(path.get(), prefix.get(), 0, PY_SSIZE_T_MAX, -1);
        if (match < 0) return -1;
        inside = match == 1;
      }
    }
    if (inside) {
      int known = PySet_Contains(seen.get(), id.get());
      if (known < 0) return -1;
      if (!known && (PySet_Add(seen.get(), id.get()) < 0 || PyList_Append(current.get(), module.get()) < 0)) return -1;
    } else {
      prefix = Ref();
    }
    PyObject* known = PyDict_GetItemWithError(walk.paths, id.get());  // borrowed
    if (!known && PyErr_Occurred()) return -1;
    bool first = known == nullptr;
    if (first) {
      Ref listed(PyList_New(1));
      if (!listed) return -1;
      Py_INCREF(path.get());  // the list's own reference
      PyList_SET_ITEM(listed.get(), 0, path.get());
      if (PyDict_SetItem(walk.paths, id.get(), listed.get()) < 0) return -1;
      if (append_pair(walk.modules, path.get(), module.get()) < 0) return -1;
      if (look_at(walk, path.get(), module.get(), plain_dict) < 0) return -1;
    } else if (PyList_Append(known, path.get()) < 0) {
      return -1;
    }
    if (inside) continue;
    bool starts;
    if (converter_of == Py_None) {  // a caller's blocks, named by any of their paths
      int named = PySequence_Contains(blocks, path.get());
      if (named < 0) return -1;
      int started = PyDict_Contains(walk.members, path.get());
      if (started < 0) return -1;
      starts = named && !started;
    } else {  // a found block starts at its module's first path
      starts = false;
      if (first) {
        Ref converter(PyObject_CallOneArg(converter_of, module.get()));
        if (!converter) return -1;
        starts = converter.get() != Py_None;
        if (starts) {
          Ref entry(PyTuple_Pack(3, path.get(), module.get(), converter.get()));
          if (!entry || PyList_Append(walk.found, entry.get()) < 0) return -1;
        }
      }
    }
    if (starts) {
      if (PyUnicode_GET_LENGTH(path.get()) == 0) {
        prefix = Ref::borrowed(n->empty);
      } else {
        prefix = Ref(PyUnicode_Concat(path.get(), n->dot));
        if (!prefix) return -1;
      }
      current = Ref(PyList_New(0));
      seen = Ref(PySet_New(nullptr));
      if (!current || !seen || PyList_Append(current.get(), module.get()) < 0 || PySet_Add(seen.get(), id.get()) < 0 ||
          PyDict_SetItem(walk.members, path.get(), current.get()) < 0)
        return -1;
    }
    if (first && append_pair(walk.outside, path.get(), module.get()) < 0) return -1;
  }
  return 0;
}

}  // namespace

// walk(walk, model, blocks, converter_of, state, plain)
PyObject* walk_modules(PyObject* /*self*/, PyObject* args) {
  PyObject *target, *model, *blocks, *converter_of;
  Walk walk{};
  if (!PyArg_ParseTuple(args, "OOOOO!O!", &target, &model, &blocks, &converter_of, &PyFrozenSet_Type, &walk.state,
                        &PyFrozenSet_Type, &walk.plain))
    return nullptr;
  Names* n = names();
  const char* fields[] = {"paths", "by_path", "modules", "values", "registered", "unspanned",
                          "spans", "found",   "members", "outside"};
  PyObject** slots[] = {&walk.paths, &walk.by_path, &walk.modules, &walk.values, &walk.registered,
                        &walk.unspanned, &walk.spans, &walk.found, &walk.members, &walk.outside};
  std::vector<Ref> held;  // the fields stay referenced for the whole walk
  for (size_t i = 0; i < sizeof(fields) / sizeof(fields[0]); ++i) {
    held.emplace_back(PyObject_GetAttrString(target, fields[i]));
    if (!held.back()) return nullptr;
    *slots[i] = held.back().get();
  }
  if (!PyDict_CheckExact(walk.paths) || !PyDict_CheckExact(walk.by_path) || !PyDict_CheckExact(walk.members) ||
      !PyList_CheckExact(walk.modules) || !PyList_CheckExact(walk.values) || !PyList_CheckExact(walk.registered) ||
      !PyList_CheckExact(walk.unspanned) || !PyList_CheckExact(walk.spans) || !PyList_CheckExact(walk.found) ||
      !PyList_CheckExact(walk.outside)) {
    PyErr_SetString(PyExc_TypeError, "walk_modules: the walk's fields are not the dicts and lists it expects");
    return nullptr;
  }
  held.emplace_back(PyObject_GetAttr(target, n->look_at));
  if (!held.back()) return nullptr;
  walk.look_at = held.back().get();
  if (walk_tree(walk, model, blocks, converter_of) < 0) return nullptr;
  Py_RETURN_NONE;
}

}  // namespace fusedconv
