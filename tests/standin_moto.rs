//! The corrected moto stand-in (tests/standins/moto_launcher.py), tested on its own against the EC2 API
//! reference's RegisterImage semantics: DescribeImages returns the block device mappings, root device, boot mode,
//! architecture, ENA flag and image tags the AMI was registered with, and registering over existing snapshots
//! makes no snapshot of its own. Stock moto drops all of these (shared/notes/cross-cloud.md section 4).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod util;

use util::aws::ec2_py;

#[test]
fn register_image_keeps_what_the_api_reference_says_it_keeps() {
    let out = ec2_py(
        "v=c.create_volume(Size=2,AvailabilityZone='us-east-1a')['VolumeId']\n\
         s1=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         s2=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         before=len(c.describe_snapshots(OwnerIds=['self'])['Snapshots'])\n\
         r=c.register_image(Name='standin-check',RootDeviceName='/dev/xvda',Architecture='arm64',BootMode='uefi',\n\
           EnaSupport=True,BlockDeviceMappings=[\n\
             {'DeviceName':'/dev/xvda','Ebs':{'SnapshotId':s1,'VolumeSize':2,'VolumeType':'gp3','DeleteOnTermination':True}},\n\
             {'DeviceName':'/dev/sdb','Ebs':{'SnapshotId':s2,'VolumeSize':3}}],\n\
           TagSpecifications=[{'ResourceType':'image','Tags':[{'Key':'k','Value':'v'}]}])\n\
         i=c.describe_images(ImageIds=[r['ImageId']])['Images'][0]\n\
         after=len(c.describe_snapshots(OwnerIds=['self'])['Snapshots'])\n\
         m=[(b['DeviceName'],b['Ebs']['SnapshotId']==(s1 if n==0 else s2),b['Ebs']['VolumeSize']) for n,b in enumerate(i['BlockDeviceMappings'])]\n\
         print(json.dumps({'m':m,'boot':i.get('BootMode'),'ena':i.get('EnaSupport'),'root':i.get('RootDeviceName'),\n\
           'arch':i.get('Architecture'),'tags':i.get('Tags'),'new_snapshots':after-before}))\n\
         p=c.register_image(Name='standin-plain',RootDeviceName='/dev/xvda',BlockDeviceMappings=[{'DeviceName':'/dev/xvda','Ebs':{'SnapshotId':s1}}])\n\
         j=c.describe_images(ImageIds=[p['ImageId']])['Images'][0]\n\
         print(json.dumps({'boot':j.get('BootMode'),'ena':j.get('EnaSupport')}))",
    );
    let mut lines = out.lines();
    let v: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(
        v["m"],
        serde_json::json!([["/dev/xvda", true, 2], ["/dev/sdb", true, 3]])
    );
    assert_eq!(v["boot"], "uefi");
    assert_eq!(v["ena"], true);
    assert_eq!(v["root"], "/dev/xvda");
    assert_eq!(v["arch"], "arm64");
    assert_eq!(v["tags"], serde_json::json!([{"Key": "k", "Value": "v"}]));
    assert_eq!(v["new_snapshots"], 0, "RegisterImage made a snapshot");
    // Registered without a boot mode or ENA flag: the image has none (EC2 decides at launch).
    let p: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(p["boot"], serde_json::Value::Null);
    assert_eq!(p["ena"], serde_json::Value::Null);
}
