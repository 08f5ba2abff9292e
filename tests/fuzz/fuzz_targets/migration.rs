//! The migration receiver on arbitrary bytes, as a destination reads a
//! connection: messages framed and checked by the stream module; a HELLO's
//! manifest decoded and planned against this build's plugins; PAGES and
//! ZERO-PAGES written into a guest RAM; MACHINE, VCPU and DEVICE sections
//! collected and decoded by the one state reader; and each DEVICE section
//! loaded by a real device of its plugin (built by the workspace: the
//! target/debug libraries, each device paused on a fake host). Every input
//! must end in a state or a named error, never a panic (a plugin's caught
//! panic counts as one here) or an allocation sized by the input beyond
//! the stream's limits.
#![no_main]

use std::{cell::RefCell, io::Cursor, path::Path};

use ferry::{
    memory::GuestRam,
    migration::{
        manifest::Manifest,
        pages,
        plan::{self, HostPlugin},
        stream::{self, Kind},
        vmstate::StateReader,
    },
    plugins::{library_file, load_one, PluginLibrary},
};
use ferry_plugin_api::{testing::FakeHost, DeviceBox, DeviceConfig, Property, StateBlob};
use libfuzzer_sys::fuzz_target;

/// What lives across inputs: RAM, the devices, the plan's view of them.
struct World {
    ram: GuestRam,
    devices: Vec<(String, DeviceBox)>,
    host: Vec<HostPlugin>,
    _libraries: Vec<PluginLibrary>,
}

/// The devices a migrated pc-2 guest with a disk and an entropy device has.
const DEVICES: [(&str, &str, &[(&str, &str)]); 6] = [
    ("com1", "serial-16550", &[("output", "none"), ("input", "none")]),
    ("rtc", "cmos-rtc", &[]),
    ("i8042", "i8042", &[]),
    ("debug-exit", "debug-exit", &[]),
    ("disk0", "virtio-blk", &[]),
    ("rng0", "virtio-rng", &[]),
];

fn world() -> World {
    let ram = GuestRam::new(16 << 20).expect("guest RAM");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug");
    let image = std::env::temp_dir().join(format!("ferry-fuzz-disk-{}.img", std::process::id()));
    let _ = std::fs::write(&image, vec![0u8; 1 << 20]);
    let image = image.display().to_string();
    let (mut devices, mut host, mut libraries) = (Vec::new(), Vec::new(), Vec::new());
    for (id, plugin, given) in DEVICES {
        let lib = match load_one(&dir.join(library_file(plugin))) {
            Ok(lib) => lib,
            Err(e) => {
                eprintln!("fuzz: device sections of {plugin} are not loaded by a device: {e} (build the workspace first)");
                continue;
            }
        };
        let properties = lib
            .descriptor
            .properties
            .iter()
            .map(|spec| {
                let value = match (plugin, spec.name.as_str()) {
                    ("virtio-blk", "path") => Some(image.clone()),
                    (_, name) => given
                        .iter()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| v.to_string())
                        .or_else(|| spec.default.clone().into_option().map(|d| d.to_string())),
                };
                Property { name: spec.name.clone(), value: value.unwrap_or_default().into() }
            })
            .collect();
        let config = DeviceConfig { id: (*id).into(), properties };
        match lib.create(config, FakeHost::new(4 << 20).handle()) {
            Ok(parts) => {
                let mut device = parts.device;
                let _ = device.pause();
                devices.push((id.to_string(), device));
            }
            Err(e) => eprintln!("fuzz: cannot create {id} ({plugin}): {e}"),
        }
        host.push(HostPlugin {
            name: lib.name().to_string(),
            version: lib.descriptor.version.to_string(),
            current: lib.descriptor.state.current,
            oldest_load: lib.descriptor.state.oldest_load,
            oldest_save: lib.descriptor.state.oldest_save,
            properties: lib.descriptor.properties.iter().map(|p| p.name.to_string()).collect(),
            defaults: Default::default(),
        });
        libraries.push(lib);
    }
    World { ram, devices, host, _libraries: libraries }
}

thread_local! {
    static WORLD: RefCell<Option<World>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    WORLD.with(|cell| {
        let mut slot = cell.borrow_mut();
        let w = slot.get_or_insert_with(world);
        let ids = w.devices.iter().map(|(id, _)| id.clone()).collect();
        let mut reader = StateReader::new(1, ids);
        let mut input = Cursor::new(data);
        for index in 0.. {
            let Ok((h, payload)) = stream::receive(&mut input, index) else { break };
            match h.kind {
                Kind::Hello => {
                    if let Ok(m) = ferry::state::decode::<Manifest>(&payload) {
                        let _ = plan::make_plan(&m, &w.host, None).lines();
                    }
                }
                k if pages::is_pages(k) => {
                    let _ = pages::receive(&w.ram, &h, &payload);
                }
                Kind::Device => {
                    if let Some((_, device)) = w.devices.iter_mut().find(|(id, _)| *id == h.id) {
                        let blob = StateBlob { version: h.version, bytes: payload.clone().into() };
                        let _ = device.load_state(blob);
                    }
                    let _ = reader.take(&h, payload);
                }
                k if StateReader::wants(k) => {
                    let _ = reader.take(&h, payload);
                }
                Kind::End => break,
                _ => {}
            }
        }
        let _ = reader.finish();
    })
});
