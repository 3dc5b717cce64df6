// Argument checks and list preparation of the fused base steps and the unperturb chain,
// shared by the CPU and CUDA implementations (see base_step.h), and their op tables.
#include "base_step.h"

#include <c10/util/Exception.h>

#include <array>
#include <cmath>

namespace fastsam {

namespace {

std::array<StepOpTable, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& tables() {
  static std::array<StepOpTable, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> t{};
  return t;
}

// prepare_lists takes an initializer list; the step ops' lists depend on their options.
PreparedLists prepare_list_vector(const char* op, const std::vector<ListArg>& a) {
  switch (a.size()) {
    case 3: return prepare_lists(op, {a[0], a[1], a[2]});
    case 4: return prepare_lists(op, {a[0], a[1], a[2], a[3]});
    case 5: return prepare_lists(op, {a[0], a[1], a[2], a[3], a[4]});
    case 6: return prepare_lists(op, {a[0], a[1], a[2], a[3], a[4], a[5]});
    case 7: return prepare_lists(op, {a[0], a[1], a[2], a[3], a[4], a[5], a[6]});
    case 8: return prepare_lists(op, {a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]});
    default: TORCH_CHECK(false, "fastsam.", op, ": ", a.size(), " tensor lists (internal error)");
  }
}

// params, sources, grads: the head of every step's lists.
std::vector<ListArg> head_lists(TensorRefs params, TensorRefs grads, TensorRefs backups, bool may_skip) {
  const bool has_backups = !backups.empty();
  // Without backups the parameters are also the sources (read through list 1), like torch.optim;
  // a skipped step then writes nothing to them.
  return {{"params", params, has_backups || !may_skip ? Access::Write : Access::ReadWrite},
          {has_backups ? "backups" : "params", has_backups ? backups : params, Access::Read},
          {"grads", grads, Access::Read}};
}

StepLists finish(const char* op, std::vector<ListArg> lists, int state_lists, bool has_backups, TensorRefs ascent,
                 TensorRefs accum) {
  if (!ascent.empty()) lists.push_back({"ascent", ascent, Access::Read});
  if (!accum.empty()) lists.push_back({"accum", accum, Access::Read});
  StepLists out{prepare_list_vector(op, lists)};
  out.state_lists = state_lists;
  out.has_backups = has_backups;
  out.gsam = !ascent.empty();
  out.accum = !accum.empty();
  return out;
}

}  // namespace

bool register_step_op_table(c10::DeviceType device, const StepOpTable& table) {
  tables()[static_cast<size_t>(device)] = table;
  return true;
}

const StepOpTable* step_op_table(c10::DeviceType device) {
  const StepOpTable& table = tables()[static_cast<size_t>(device)];
  return table.sgd_step != nullptr ? &table : nullptr;
}

StepLists prepare_sgd_lists(TensorRefs params, TensorRefs grads, TensorRefs momentum_buffers, TensorRefs backups,
                            bool momentum, bool first, bool may_skip, TensorRefs ascent, TensorRefs accum) {
  std::vector<ListArg> lists = head_lists(params, grads, backups, may_skip);
  // first: the buffers are only written (torch clones d into them), unless the step is skipped
  if (momentum) {
    lists.push_back({"momentum_buffers", momentum_buffers, first && !may_skip ? Access::Write : Access::ReadWrite});
  }
  return finish("sgd_step_", std::move(lists), momentum ? 1 : 0, !backups.empty(), ascent, accum);
}

StepLists prepare_adam_lists(TensorRefs params, TensorRefs grads, TensorRefs exp_avgs, TensorRefs exp_avg_sqs,
                             TensorRefs max_exp_avg_sqs, TensorRefs backups, bool amsgrad, bool may_skip,
                             TensorRefs ascent, TensorRefs accum) {
  std::vector<ListArg> lists = head_lists(params, grads, backups, may_skip);
  lists.push_back({"exp_avgs", exp_avgs, Access::ReadWrite});
  lists.push_back({"exp_avg_sqs", exp_avg_sqs, Access::ReadWrite});
  if (amsgrad) lists.push_back({"max_exp_avg_sqs", max_exp_avg_sqs, Access::ReadWrite});
  return finish("adam_step_", std::move(lists), amsgrad ? 3 : 2, !backups.empty(), ascent, accum);
}

StepScalarArgs step_scalar_args(const char* op, at::Device device, const OptionalTensor& lr_tensor,
                                const OptionalTensor& grad_scale, const OptionalTensor& found_inf,
                                bool has_ascent, const OptionalTensor& gsam_stats, double alpha, double gsam_eps,
                                double accum_scale, bool maximize) {
  TORCH_CHECK(has_ascent == gsam_stats.has_value(), "fastsam.", op, ": GSAM's ascent and gsam_stats go together ",
              "(stats from gsam_reduce or restore_gsam_reduce); got ", has_ascent ? "ascent without stats" :
              "stats without ascent");
  StepScalarArgs out;
  if (lr_tensor.has_value()) out.lr = scalar_on(op, "lr", *lr_tensor, device, 1);
  if (grad_scale.has_value()) out.grad_scale = scalar_on(op, "grad_scale", *grad_scale, device, 1);
  if (found_inf.has_value()) out.found_inf = scalar_on(op, "found_inf", *found_inf, device, 1);
  if (gsam_stats.has_value()) out.gsam_stats = scalar_on(op, "gsam_stats", *gsam_stats, device, 2);
  out.alpha = alpha;
  out.gsam_eps = gsam_eps;
  out.accum_scale = accum_scale;
  out.maximize = maximize;
  return out;
}

void check_steps(TensorRefs steps, size_t params, at::Device device) {
  TORCH_CHECK(steps.size() == params, "fastsam.adam_step_: steps has ", steps.size(), " tensors but params has ",
              params, "; Adam keeps one step count per parameter (state['step'])");
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.defined() && s.numel() == 1 && s.scalar_type() == at::kFloat, "fastsam.adam_step_: steps[", i,
                "] must be a 1-element float32 tensor (torch.optim.Adam's state['step']); got ",
                s.defined() ? c10::toString(s.scalar_type()) : "undefined", " of shape ",
                s.defined() ? s.sizes() : at::IntArrayRef{});
    TORCH_CHECK(s.device() == device, "fastsam.adam_step_: steps[", i, "] is on ", s.device(),
                " but the parameters are on ", device,
                "; keep the step counts on the parameters' device (as torch.optim.Adam does with fused=True or "
                "capturable=True)");
  }
}

void check_sgd_hyper(double lr, double momentum, double dampening, bool nesterov, bool has_buffers) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "fastsam.sgd_step_: invalid learning rate ", lr);
  TORCH_CHECK(momentum >= 0.0, "fastsam.sgd_step_: invalid momentum ", momentum);
  TORCH_CHECK(!nesterov || (momentum > 0.0 && dampening == 0.0),
              "fastsam.sgd_step_: Nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD)");
  TORCH_CHECK(has_buffers == (momentum != 0.0), "fastsam.sgd_step_: ",
              momentum != 0.0 ? "momentum != 0 needs one momentum buffer per parameter"
                              : "momentum buffers were given but momentum is 0");
}

void check_adam_hyper(double lr, double beta1, double beta2, double eps, bool amsgrad, bool has_max) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, "fastsam.adam_step_: invalid learning rate ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "fastsam.adam_step_: betas must be in [0, 1); got (", beta1, ", ", beta2, ")");
  TORCH_CHECK(eps >= 0.0, "fastsam.adam_step_: invalid epsilon ", eps);
  TORCH_CHECK(has_max == amsgrad, "fastsam.adam_step_: ",
              amsgrad ? "amsgrad needs one max_exp_avg_sq per parameter" : "max_exp_avg_sqs were given without amsgrad");
}

}  // namespace fastsam
