// Registering the ops' kernels as boxed functions that read their arguments where they
// lie on the dispatcher's stack. Calls from Python always arrive boxed; the standard
// unboxing adaptor copies each Tensor[] argument into a std::vector<at::Tensor> (an atomic
// reference-count update per tensor, twice) around the kernel. Measured with `perf` on a
// SAM sub-step over 4096 tensors: the kernels' share of CPU samples rose from 28% to 30%
// (the rest is mostly torch converting the Python lists, which no kernel can avoid).
// TensorRefs (tensor_lists.h) views a Tensor[] argument without copying handles.
#pragma once

#include <ATen/core/stack.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>

#include "tensor_lists.h"

namespace fastsam {
namespace boxed_detail {

template <typename T>
struct Arg;

template <>
struct Arg<TensorRefs> {
  static TensorRefs get(const c10::IValue& v) { return TensorRefs(v.toListRef()); }
};
template <>
struct Arg<const at::Tensor&> {
  static const at::Tensor& get(const c10::IValue& v) { return v.toTensor(); }
};
template <>
struct Arg<const std::optional<at::Tensor>&> {
  static std::optional<at::Tensor> get(const c10::IValue& v) {
    return v.isNone() ? std::nullopt : std::optional<at::Tensor>(v.toTensor());
  }
};
template <>
struct Arg<int64_t> {
  static int64_t get(const c10::IValue& v) { return v.toInt(); }
};
template <>
struct Arg<double> {
  static double get(const c10::IValue& v) { return v.toDouble(); }
};
template <>
struct Arg<bool> {
  static bool get(const c10::IValue& v) { return v.toBool(); }
};

template <typename Fn>
struct Signature;
template <typename R, typename... A>
struct Signature<R (*)(A...)> {
  using Ret = R;
  using Args = std::tuple<A...>;
};

template <auto Fn, typename R, typename... A, size_t... I>
void call(torch::jit::Stack* stack, std::tuple<A...>*, std::index_sequence<I...>) {
  constexpr size_t n = sizeof...(A);
  auto args = torch::jit::last(*stack, n);
  if constexpr (std::is_void_v<R>) {
    Fn(Arg<A>::get(args[I])...);
    torch::jit::drop(*stack, n);
  } else {
    R out = Fn(Arg<A>::get(args[I])...);
    torch::jit::drop(*stack, n);
    torch::jit::push(*stack, std::move(out));
  }
}

template <auto Fn>
void boxed_kernel(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  using S = Signature<decltype(Fn)>;
  using Args = typename S::Args;
  call<Fn, typename S::Ret>(stack, static_cast<Args*>(nullptr), std::make_index_sequence<std::tuple_size_v<Args>>());
}

}  // namespace boxed_detail

// m.impl("op", boxed<&op_cpu>()) for a function taking TensorRefs / const at::Tensor& /
// const std::optional<at::Tensor>& / int64_t / double / bool in schema order.
template <auto Fn>
torch::CppFunction boxed() {
  return torch::CppFunction::makeFromBoxedFunction<&boxed_detail::boxed_kernel<Fn>>();
}

}  // namespace fastsam
