// Runs a TorchScript model that uses convbn (saved from Python with
// torch.jit.save) in a C++ process with no Python: the template to copy for
// deploying a scripted model.
//
//   convbn_jit_infer MODEL.pt N C H W [--dtype float32|float64]
//                    [--device cpu|cuda] [--seed S] [--save FILE]
//
// The model runs in eval mode (batch norm folded into the conv) on a random
// input of shape (N, C, H, W). --save writes (input, output) for torch.load.
//
// The convbn operators register themselves when libconvbn.so is loaded: this
// program is linked with --no-as-needed so that the library stays a
// dependency although nothing here calls it by name.
#include "cli.h"

#include <torch/script.h>

int main(int argc, char** argv) {
  const auto args = convbn_example::parse_args(
      argc, argv,
      "MODEL.pt N C H W [--dtype float32|float64] [--device DEVICE] [--seed S] [--save FILE]  (or --build-info)");
  torch::jit::script::Module model;
  try {
    model = torch::jit::load(args.model, args.device);
  } catch (const c10::Error& error) {
    std::cerr << "could not load " << args.model << ": " << error.what_without_backtrace() << "\n";
    return 1;
  }
  model.eval();
  const torch::Tensor input = convbn_example::make_input(args);
  torch::Tensor output;
  {
    c10::InferenceMode inference;
    output = model.forward({input}).toTensor();
  }
  convbn_example::report(args, input, output);
  return 0;
}
