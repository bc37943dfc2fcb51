// Runs a model compiled ahead of time with AOTInductor (a .pt2 package made
// in Python by torch._inductor.aoti_compile_and_package from a
// torch.export'ed model) in a C++ process with no Python.
//
//   convbn_aoti_infer MODEL.pt2 N C H W [--dtype float32|float64]
//                     [--device cpu|cuda] [--seed S] [--save FILE]
//
// In eval mode the package holds plain ATen code (batch norm folded into the
// conv); libconvbn.so is linked (--no-as-needed) so that packages which do
// call convbn operators find them registered.
#include "cli.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

int main(int argc, char** argv) {
  const auto args = convbn_example::parse_args(
      argc, argv,
      "MODEL.pt2 N C H W [--dtype float32|float64] [--device DEVICE] [--seed S] [--save FILE]  (or --build-info)");
  const torch::Tensor input = convbn_example::make_input(args);
  std::vector<torch::Tensor> outputs;
  try {
    torch::inductor::AOTIModelPackageLoader loader(args.model);
    c10::InferenceMode inference;
    outputs = loader.run({input});
  } catch (const c10::Error& error) {
    std::cerr << "could not run " << args.model << ": " << error.what_without_backtrace() << "\n";
    return 1;
  }
  convbn_example::report(args, input, outputs.at(0));
  return 0;
}
