#![allow(clippy::unwrap_used, clippy::expect_used)]
//! `imgshift images list|share|unshare|copy --on azure` against the fake ARM (`tests/standins/fake_arm.py`, which
//! follows the ARM REST reference for these calls) with Azurite behind it: what is listed by tag, the request
//! bodies sent (role assignment, gallery sharing profile update, replication target regions), and what the fake
//! holds afterwards.

mod azure_util;
mod util;

use azure_util::{Env, RG, SUB, TOKEN};
use serde_json::{Value, json};
use util::*;

const PRINCIPAL: &str = "0a1b2c3d-0000-4000-8000-00000000beef";
const SUB_B: &str = "6d3c5e4a-0000-4000-8000-00000000000b";
const SUB_C: &str = "6d3c5e4a-0000-4000-8000-00000000000c";
const READER: &str = "acdd72a7-3385-48ef-bd42-f606fba81ae7";

/// `imgshift migrate` of a small VHDX into image `name` and gallery version `gallery`/`def`/1.0.0.
fn migrated(env: &Env, name: &str, gallery: &str, def: &str) {
    let vhdx = env.path().join(format!("{name}.vhdx"));
    qemu_img(&["create", "-q", "-f", "vhdx", s(&vhdx), "32M"]);
    let mut c = env.cmd();
    c.args(["migrate", s(&vhdx), "--to", "azure", "--subscription", SUB])
        .args(["--resource-group", RG, "--location", "westeurope"])
        .args([
            "--arm-endpoint",
            &env.arm_url(),
            "--name",
            name,
            "--force",
            "--yes",
        ])
        .args([
            "--gallery",
            gallery,
            "--gallery-image",
            def,
            "--gallery-version",
            "1.0.0",
        ])
        .args(["--state-dir", s(&env.path().join("state"))]);
    azure_util::run(c).ok();
}

fn images(env: &Env, args: &[&str]) -> Run {
    let mut c = env.cmd();
    c.arg("images").args(args).args([
        "--on",
        "azure",
        "--subscription",
        SUB,
        "-g",
        RG,
        "--arm-endpoint",
        &env.arm_url(),
        "--max-attempts",
        "1",
    ]);
    azure_util::run(c)
}

/// A managed image imgshift did not make (no tag), PUT straight to the fake ARM.
fn foreign_image(env: &Env, name: &str) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail", "--cacert", s(&env.ca), "-X", "PUT"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .args(["-H", "Content-Type: application/json"])
        .args(["-d", r#"{"location":"westeurope","properties":{}}"#])
        .arg(format!(
            "{}/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/images/{name}?api-version=2024-07-01",
            env.arm_url()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn listed(env: &Env, all: bool) -> Vec<(String, String, Value)> {
    let mut args = vec!["list", "--output", "json"];
    if all {
        args.push("--all");
    }
    let r = images(env, &args).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["kind"].as_str().unwrap().to_string(),
                i["name"].as_str().unwrap().to_string(),
                i.clone(),
            )
        })
        .collect()
}

#[test]
fn list_share_and_replicate_gallery_images() {
    let env = Env::start(
        "imgafter",
        &[
            "--gallery-sharing",
            "gal=Private",
            "--gallery-sharing",
            "direct=Groups",
            "--gallery-sharing",
            "comm=Community",
        ],
        None,
    );
    migrated(&env, "img-a", "gal", "def");
    migrated(&env, "img-b", "direct", "def2");
    migrated(&env, "img-c", "comm", "def3");
    foreign_image(&env, "not-ours");

    // list: imgshift's images and versions by their tag; --all adds the foreign one.
    let mine = listed(&env, false);
    let names: Vec<(&str, &str)> = mine
        .iter()
        .map(|(k, n, _)| (k.as_str(), n.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("gallery image version", "comm/def3/1.0.0"),
            ("gallery image version", "direct/def2/1.0.0"),
            ("gallery image version", "gal/def/1.0.0"),
            ("image", "img-a"),
            ("image", "img-b"),
            ("image", "img-c"),
        ]
    );
    let version = &mine[2].2;
    assert_eq!(version["sharing"], "Private");
    assert_eq!(version["location"], "westeurope");
    assert!(version["job"].as_str().unwrap().starts_with("migrate-"));
    assert!(
        version["source_disks"][0]
            .as_str()
            .unwrap()
            .ends_with("/disks/img-a-os")
    );
    assert_eq!(mine[0].2["sharing"], "Community");
    assert_eq!(mine[1].2["sharing"], "Groups");
    let all = listed(&env, true);
    assert_eq!(all.len(), 7);
    assert!(
        all.iter()
            .any(|(_, n, i)| n == "not-ours" && i["job"].is_null())
    );

    // share with a principal: a Reader role assignment on the image definition, once however often it runs.
    let gal = ["--gallery", "gal", "--gallery-image", "def"];
    let share = |verb: &str, extra: &[&str]| -> Run {
        let mut a = vec![verb, "1.0.0"];
        a.extend_from_slice(extra);
        a.extend_from_slice(&gal);
        images(&env, &a)
    };
    let r = share("share", &["--principal", PRINCIPAL]).ok();
    assert!(
        r.stdout
            .contains(&format!("{PRINCIPAL} may read galleries/gal/images/def")),
        "{}",
        r.stdout
    );
    share("share", &["--principal", PRINCIPAL]).ok();
    let puts: Vec<(String, Value)> = env
        .records()
        .into_iter()
        .filter(|r| r["method"] == "PUT" && r["path"].as_str().unwrap().contains("roleAssignments"))
        .map(|r| (r["path"].as_str().unwrap().to_string(), r["body"].clone()))
        .collect();
    assert_eq!(puts.len(), 2);
    assert_eq!(
        puts[0].0, puts[1].0,
        "the second share made another assignment"
    );
    assert!(puts[0].0.starts_with(&format!(
        "/subscriptions/{SUB}/resourceGroups/{RG}/providers/Microsoft.Compute/galleries/gal/images/def/providers/Microsoft.Authorization/roleAssignments/"
    )));
    assert_eq!(
        puts[0].1,
        json!({"properties": {
            "roleDefinitionId": format!("/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/{READER}"),
            "principalId": PRINCIPAL}})
    );
    let held = |env: &Env| -> Vec<String> {
        env.held()
            .1
            .into_iter()
            .filter(|r| r.contains("roleAssignments"))
            .collect()
    };
    assert_eq!(held(&env).len(), 1);
    let api: Vec<String> = env
        .records()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().contains("roleAssignments"))
        .map(|r| r["api"].as_str().unwrap().to_string())
        .collect();
    assert!(api.iter().all(|a| a == "2022-04-01"), "{api:?}");
    let r = share("unshare", &["--principal", PRINCIPAL]).ok();
    assert!(r.stdout.contains("removed the Reader role"), "{}", r.stdout);
    assert!(held(&env).is_empty());

    // A private gallery has no sharing profile to add subscriptions to: a clear error, nothing sent.
    let before = env.records().len();
    let r = share("share", &["--subscriptions", SUB_B]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("gallery gal is not a direct-shared gallery"),
        "{}",
        r.stderr
    );
    assert!(
        !env.records()[before..]
            .iter()
            .any(|x| x["path"].as_str().unwrap().ends_with("/share"))
    );

    // A direct-shared gallery: the sharing profile update, Add then Remove.
    let direct = ["--gallery", "direct", "--gallery-image", "def2"];
    let mut a = vec![
        "share",
        "1.0.0",
        "--subscriptions",
        &format!("{SUB_B},{SUB_C}"),
    ]
    .into_iter()
    .map(str::to_string)
    .collect::<Vec<_>>();
    a.extend(direct.iter().map(|x| x.to_string()));
    let args: Vec<&str> = a.iter().map(String::as_str).collect();
    images(&env, &args).ok();
    let mut a2 = args.clone();
    a2[0] = "unshare";
    images(&env, &a2).ok();
    let posts = env.bodies("POST", "/galleries/direct/share");
    assert_eq!(
        posts,
        [
            json!({"operationType": "Add", "groups": [{"type": "Subscriptions", "ids": [SUB_B, SUB_C]}]}),
            json!({"operationType": "Remove", "groups": [{"type": "Subscriptions", "ids": [SUB_B, SUB_C]}]}),
        ]
    );

    // Tenants through the same profile; a community gallery made public, then reset.
    images(
        &env,
        &[
            "share",
            "1.0.0",
            "--tenants",
            azure_util::TENANT,
            "--gallery",
            "direct",
            "--gallery-image",
            "def2",
        ],
    )
    .ok();
    assert_eq!(
        env.bodies("POST", "/galleries/direct/share")[2],
        json!({"operationType": "Add", "groups": [{"type": "AADTenants", "ids": [azure_util::TENANT]}]})
    );
    let comm = ["--gallery", "comm", "--gallery-image", "def3", "--public"];
    let mut a = vec!["share", "1.0.0"];
    a.extend_from_slice(&comm);
    let r = images(&env, &a).ok();
    assert!(
        r.stdout.contains("community gallery comm is public"),
        "{}",
        r.stdout
    );
    a[0] = "unshare";
    images(&env, &a).ok();
    assert_eq!(
        env.bodies("POST", "/galleries/comm/share"),
        [
            json!({"operationType": "EnableCommunity"}),
            json!({"operationType": "Reset"})
        ]
    );
    // --public on a private gallery: refused, naming why.
    let r = images(
        &env,
        &[
            "share",
            "1.0.0",
            "--public",
            "--gallery",
            "gal",
            "--gallery-image",
            "def",
        ],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not a community gallery"), "{}", r.stderr);

    // A plain managed image cannot be shared.
    let r = images(&env, &["share", "img-a", "--principal", PRINCIPAL]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr.contains("img-a is a managed image"),
        "{}",
        r.stderr
    );
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);

    // copy: the target regions of the version, its own region kept; a rerun changes nothing.
    let mut c = vec![
        "copy",
        "1.0.0",
        "--to-regions",
        "eastus2,northeurope",
        "--output",
        "json",
    ];
    c.extend_from_slice(&gal);
    let r = images(&env, &c).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["changed"], true);
    assert_eq!(
        v["target_regions"],
        json!(["westeurope", "eastus2", "northeurope"])
    );
    let patches = env.bodies("PATCH", "/galleries/gal/images/def/versions/1.0.0");
    assert_eq!(
        patches,
        [
            json!({"properties": {"publishingProfile": {"targetRegions": [
            {"name": "westeurope", "regionalReplicaCount": 1},
            {"name": "eastus2", "regionalReplicaCount": 1},
            {"name": "northeurope", "regionalReplicaCount": 1}]}}})
        ]
    );
    let r = images(&env, &c).ok();
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["changed"], false);
    assert_eq!(env.bodies("PATCH", "/versions/").len(), 1);
    let after = listed(&env, false);
    let gv = after.iter().find(|(_, n, _)| n == "gal/def/1.0.0").unwrap();
    assert_eq!(
        gv.2["target_regions"],
        json!(["westeurope", "eastus2", "northeurope"])
    );

    // A managed image cannot be replicated: usage error.
    let r = images(&env, &["copy", "img-a", "--to-regions", "eastus2"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
}
