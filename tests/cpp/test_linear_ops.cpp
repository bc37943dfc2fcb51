// The linear_bn operators called from C++ through the dispatcher, against
// torch::nn::Linear + torch::nn::BatchNorm1d in float64.
#include <convbn.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

void expect_close_linear(const torch::Tensor& a, const torch::Tensor& b) {
  ASSERT_EQ(a.sizes(), b.sizes());
  EXPECT_TRUE(torch::allclose(a, b, 1e-9, 1e-9))
      << "max abs difference " << (a - b).abs().max().item<double>();
}

class LinearBNTest : public ::testing::TestWithParam<bool> {};

TEST_P(LinearBNTest, TrainStepsAndEvalMatchLinearThenBatchNorm1d) {
  torch::manual_seed(0);
  torch::nn::Linear linear(torch::nn::LinearOptions(5, 4).bias(true));
  torch::nn::BatchNorm1d bn(torch::nn::BatchNormOptions(4).momentum(0.2));
  linear->to(torch::kFloat64);
  bn->to(torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    bn->weight.uniform_(0.5, 1.5);
    bn->bias.normal_();
  }
  auto weight = linear->weight.detach().clone().requires_grad_();
  auto bias = linear->bias.detach().clone().requires_grad_();
  auto gamma = bn->weight.detach().clone().requires_grad_();
  auto beta = bn->bias.detach().clone().requires_grad_();
  auto running_mean = torch::zeros({4}, torch::kFloat64);
  auto running_var = torch::ones({4}, torch::kFloat64);
  auto num_batches_tracked = torch::zeros({}, torch::kLong);

  for (int64_t batch : {8, 3}) {
    auto x = torch::randn({batch, 5}, torch::kFloat64) * 3 + 1;
    auto [out, mean, invstd, kept] = convbn::linear_bn_train(
        x, weight, bias, gamma, beta, 1e-5, /*memory_efficient=*/GetParam());
    EXPECT_EQ(kept.numel() == 0, GetParam());
    convbn::update_running_stats(
        running_mean, running_var, num_batches_tracked, mean, invstd, 1e-5,
        0.2, batch);
    auto ref = bn(linear(x));
    expect_close_linear(out, ref);
    auto grad = torch::randn_like(ref);
    out.backward(grad);
    ref.backward(grad);
    expect_close_linear(weight.grad(), linear->weight.grad());
    expect_close_linear(bias.grad(), linear->bias.grad());
    expect_close_linear(gamma.grad(), bn->weight.grad());
    expect_close_linear(beta.grad(), bn->bias.grad());
    for (auto* t : {&weight, &bias, &gamma, &beta}) {
      t->mutable_grad().zero_();
    }
    for (auto& p : linear->parameters()) {
      p.mutable_grad().zero_();
    }
    for (auto& p : bn->parameters()) {
      p.mutable_grad().zero_();
    }
  }
  expect_close_linear(running_mean, bn->running_mean);
  expect_close_linear(running_var, bn->running_var);
  EXPECT_EQ(num_batches_tracked.item<int64_t>(), 2);

  bn->eval();
  auto x = torch::randn({6, 5}, torch::kFloat64);
  expect_close_linear(
      convbn::linear_bn_eval(
          x, weight, bias, gamma, beta, running_mean, running_var, 1e-5),
      bn(linear(x)));
}

INSTANTIATE_TEST_SUITE_P(
    MemoryModes,
    LinearBNTest,
    ::testing::Values(true, false),
    [](const auto& info) {
      return info.param ? "MemoryEfficient" : "KeepOutput";
    });

TEST(LinearBN, ThreeDimensionalInputIsRefusedWithAClearError) {
  try {
    convbn::linear_bn_train(
        torch::randn({2, 3, 5}), torch::randn({4, 5}), std::nullopt,
        std::nullopt, std::nullopt, 1e-5);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(
        std::string(e.what()).find("expected `input` of shape (N, in_features)"),
        std::string::npos)
        << e.what();
  }
}

} // namespace
