// C ABI over TorchScript modules: load, submodules by path, method calls (positional and by
// keyword, with IValue arguments and results), method schemas, named parameters and buffers,
// and the graph executor's optimization switch. Same conventions as shim.cpp (protect.h): 0 on
// success, -1 with a thread-local message on failure; no exception crosses the boundary.
//
// IValues cross the boundary as `torch::jit::IValue*`, the `ivalue` type of torch-sys's
// libtch/torch_api.h: the Rust side builds them with torch-sys's `ati_*` functions (compiled
// against the same libtorch headers) and frees results with `ati_free` (`delete`).
#include "shim.h"
#include "protect.h"

#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/csrc/jit/serialization/import.h>

#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

using torch::jit::Module;

extern "C" {

int lo_jit_load(const char* path, int device_type, int device_index, void** out) {
  LO_PROTECT({
    c10::Device device(static_cast<c10::DeviceType>(device_type), static_cast<c10::DeviceIndex>(device_index));
    *out = new Module(torch::jit::load(std::string(path), device));
  })
}

void lo_jit_free(void* module) {
  try {
    delete static_cast<Module*>(module);
  } catch (...) {
  }
}

int lo_jit_submodule(void* module, const char* path, void** out) {
  LO_PROTECT({
    Module cur = *static_cast<Module*>(module);
    std::string p(path);
    size_t start = 0;
    while (start <= p.size()) {
      size_t dot = p.find('.', start);
      std::string part = p.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
      TORCH_CHECK(!part.empty(), "empty component in submodule path '", p, "'");
      auto slot = cur._ivalue()->type()->findAttributeSlot(part);
      TORCH_CHECK(slot.has_value(), "no attribute '", part, "' in module path '", p, "'");
      auto value = cur.attr(part);
      TORCH_CHECK(value.isModule(), "'", part, "' in path '", p, "' is not a module");
      cur = value.toModule();
      if (dot == std::string::npos) break;
      start = dot + 1;
    }
    *out = new Module(cur);
  })
}

int lo_jit_forward(void* module, void** inputs, int n, void** out) {
  LO_PROTECT({
    std::vector<c10::IValue> args;
    args.reserve(n);
    for (int i = 0; i < n; ++i) args.emplace_back(*static_cast<at::Tensor*>(inputs[i]));
    auto result = static_cast<Module*>(module)->forward(std::move(args));
    TORCH_CHECK(result.isTensor(), "forward returned a ", result.tagKind(), ", not a tensor");
    *out = new at::Tensor(result.toTensor());
  })
}

int lo_jit_named_tensors(void* module, int buffers, void* ctx, void (*cb)(void*, const char*, void*)) {
  LO_PROTECT({
    auto& m = *static_cast<Module*>(module);
    if (buffers) {
      for (const auto& nb : m.named_buffers(/*recurse=*/true)) cb(ctx, nb.name.c_str(), new at::Tensor(nb.value));
    } else {
      for (const auto& np : m.named_parameters(/*recurse=*/true)) cb(ctx, np.name.c_str(), new at::Tensor(np.value));
    }
  })
}

int lo_jit_call(void* module, const char* method, void** args, int n_args, const char** kw_names,
                void** kw_values, int n_kw, int* found, void** out) {
  LO_PROTECT({
    *out = nullptr;
    auto m = static_cast<Module*>(module)->find_method(method);
    *found = m.has_value() ? 1 : 0;
    if (!m) return 0;
    std::vector<c10::IValue> stack;
    stack.reserve(n_args);
    for (int i = 0; i < n_args; ++i) stack.push_back(*static_cast<c10::IValue*>(args[i]));
    torch::jit::Kwargs kwargs;
    for (int i = 0; i < n_kw; ++i) kwargs.emplace(kw_names[i], *static_cast<c10::IValue*>(kw_values[i]));
    // Method::operator() checks the arguments against the schema, fills defaults and runs.
    *out = new c10::IValue((*m)(std::move(stack), kwargs));
  })
}

int lo_jit_method_names(void* module, void* ctx, void (*cb)(void*, const char*)) {
  LO_PROTECT({
    for (const auto& m : static_cast<Module*>(module)->get_methods()) cb(ctx, m.name().c_str());
  })
}

int lo_jit_method_schema(void* module, const char* method, int* found, void* ctx,
                         void (*cb)(void*, int, const char*, const char*, const char*)) {
  LO_PROTECT({
    auto m = static_cast<Module*>(module)->find_method(method);
    *found = m.has_value() ? 1 : 0;
    if (!m) return 0;
    const auto& schema = m->function().getSchema();
    const auto& args = schema.arguments();
    for (size_t i = 0; i < args.size(); ++i) {
      const auto& a = args[i];
      if (i == 0 && a.name() == "self") continue;  // the module itself, bound by the call
      std::string type = a.type()->annotation_str();
      if (a.default_value().has_value()) {
        std::ostringstream os;
        os << *a.default_value();
        std::string dflt = os.str();
        cb(ctx, 0, a.name().c_str(), type.c_str(), dflt.c_str());
      } else {
        cb(ctx, 0, a.name().c_str(), type.c_str(), nullptr);
      }
    }
    for (const auto& r : schema.returns()) {
      std::string type = r.type()->annotation_str();
      cb(ctx, 1, r.name().c_str(), type.c_str(), nullptr);
    }
  })
}

int lo_jit_eval(void* module) { LO_PROTECT(static_cast<Module*>(module)->eval()) }

int lo_jit_set_optimize(int on) { LO_PROTECT(torch::jit::setGraphExecutorOptimize(on != 0)) }

int lo_jit_get_optimize(int* on) { LO_PROTECT(*on = torch::jit::getGraphExecutorOptimize() ? 1 : 0) }

}  // extern "C"
