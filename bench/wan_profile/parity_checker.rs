// Scratch check of bench/wan_profile/proposed.diff, built OUTSIDE this repo (in /tmp/wancheck: a copy of
// wan/ at HEAD with the diff applied, plus this file as the binary of a crate "checker" with
// dependencies wan = { package = "layerwise-offload-wan", path = "../wan" } and tch = "=0.24.0").
// Run before and after the diff: fp32 CPU output against the tests/fixtures/wan_tiny diffusers output
// (bit-exact both times), and the bf16 CPU output saved for a before/after comparison (bit-equal).
use tch::{Device, Kind, Tensor, nn};
fn main() {
    let fx = std::path::PathBuf::from("/work/main/tests/fixtures/wan_tiny");
    let io: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fx.join("inputs_and_output.safetensors")).unwrap().into_iter().collect();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let (_c, model) = wan::from_pretrained(&mut vs, &fx, Kind::Float).unwrap();
    let out = tch::no_grad(|| model.forward(&io["latents"], &io["timestep"], &io["encoder_hidden_states"])).unwrap();
    let want = &io["output"];
    let d = (&out - want).abs().max().double_value(&[]);
    println!("fp32 CPU: max |rust - diffusers| = {d:e}, bit-exact {}", out.equal(want));
    // without no_grad too (the rotary copy_ under autograd)
    let out2 = model.forward(&io["latents"], &io["timestep"], &io["encoder_hidden_states"]).unwrap();
    println!("grad mode: bit-exact with no_grad {}", out2.equal(&out));
    // bf16 on the CPU: same weights in bf16 with diffusers' fp32 modules
    wan::set_kind(&mut vs, Kind::BFloat16);
    let ob = tch::no_grad(|| model.forward(&io["latents"], &io["timestep"], &io["encoder_hidden_states"])).unwrap();
    println!("bf16 CPU: sum {:.6} first {:?}", ob.to_kind(Kind::Float).sum(Kind::Float).double_value(&[]),
        Vec::<f32>::try_from(ob.to_kind(Kind::Float).flatten(0, -1).slice(0, 0, 6, 1)).unwrap());
    ob.to_kind(Kind::Float).save(std::env::args().nth(1).unwrap_or("/tmp/wancheck/bf16_out.pt".into())).unwrap();
}
