// Command-line handling shared by the two inference programs: a model file,
// an input shape, and options. Kept apart so each program reads as what it
// does: load, make an input, run, report.
#pragma once

#include <convbn.h>  // from the installed package (convbn::convbn)
#include <torch/torch.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

namespace convbn_example {

struct Args {
  std::string model;
  std::vector<int64_t> shape;   // the input's (N, C, H, W)
  torch::Dtype dtype = torch::kFloat32;
  torch::Device device = torch::kCPU;
  uint64_t seed = 0;
  std::string save;             // where to write (input, output), if anywhere
};

// Exits with status 2 and the usage line on a bad command line.
inline Args parse_args(int argc, char** argv, const char* usage) {
  auto fail = [&](const std::string& why) {
    std::cerr << why << "\nusage: " << argv[0] << " " << usage << "\n";
    std::exit(2);
  };
  Args args;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--build-info") {  // what the linked convbn was built with
      std::cout << convbn::build_info();
      std::exit(0);
    }
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        fail(arg + " needs a value");
      }
      return argv[++i];
    };
    if (arg == "--dtype") {
      const std::string name = value();
      if (name == "float32") {
        args.dtype = torch::kFloat32;
      } else if (name == "float64") {
        args.dtype = torch::kFloat64;
      } else {
        fail("--dtype takes float32 or float64, got " + name);
      }
    } else if (arg == "--device") {
      args.device = torch::Device(value());
    } else if (arg == "--seed") {
      args.seed = std::stoull(value());
    } else if (arg == "--save") {
      args.save = value();
    } else if (arg.rfind("--", 0) == 0) {
      fail("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (positional.size() < 2) {
    fail("expected a model file and an input shape");
  }
  args.model = positional[0];
  for (size_t i = 1; i < positional.size(); ++i) {
    char* end = nullptr;
    const long long size = std::strtoll(positional[i].c_str(), &end, 10);
    if (*end != '\0' || size <= 0) {
      fail("input sizes must be positive integers, got " + positional[i]);
    }
    args.shape.push_back(size);
  }
  return args;
}

inline torch::Tensor make_input(const Args& args) {
  torch::manual_seed(args.seed);
  return torch::randn(args.shape, torch::dtype(args.dtype)).to(args.device);
}

// Prints what came out; with --save, writes (input, output) with
// torch::pickle_save, which Python reads with torch.load.
inline void report(const Args& args, const torch::Tensor& input, const torch::Tensor& output) {
  std::cout << "input  " << input.sizes() << " " << input.dtype() << "\n"
            << "output " << output.sizes() << " " << output.dtype()
            << " mean " << output.mean().item<double>()
            << " std " << output.std().item<double>() << "\n";
  if (!args.save.empty()) {
    const auto bytes = torch::pickle_save(
        c10::ivalue::Tuple::create({input.cpu(), output.cpu()}));
    std::ofstream file(args.save, std::ios::binary);
    file.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!file) {
      std::cerr << "could not write " << args.save << "\n";
      std::exit(1);
    }
    std::cout << "saved (input, output) to " << args.save << "\n";
  }
}

} // namespace convbn_example
