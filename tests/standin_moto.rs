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

/// Account B, as moto names accounts: the header `x-moto-account-id` picks the account's backend.
const ACCOUNT_B: &str = "222233334444";

/// moto_launcher.py's `describe_images_sees_amis_shared_by_other_accounts`, against the EC2 API reference's
/// DescribeImages: images available to a caller are its own, public ones, and other accounts' with an explicit
/// launch permission for it; ImageIds leaves out what it cannot launch; Owners and ExecutableUsers scope them.
/// Another account still cannot change an AMI it does not own.
#[test]
fn describe_images_shows_other_accounts_amis_only_as_launch_permissions_allow() {
    let out = ec2_py(&format!(
        "B='{ACCOUNT_B}'\n\
         b=boto3.client('ec2',endpoint_url=c.meta.endpoint_url,region_name='us-east-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
         b.meta.events.register('before-sign.ec2.*',lambda request,**kw: request.headers.__setitem__('x-moto-account-id',B))\n\
         A=c.describe_images(Owners=['self'])  # touch account A\n\
         v=c.create_volume(Size=1,AvailabilityZone='us-east-1a')['VolumeId']\n\
         s=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         def reg(n):\n\
         \x20   return c.register_image(Name=n,RootDeviceName='/dev/xvda',BlockDeviceMappings=[{{'DeviceName':'/dev/xvda','Ebs':{{'SnapshotId':s}}}}])['ImageId']\n\
         import uuid\n\
         u=uuid.uuid4().hex[:8]\n\
         shared,private,public=reg('shared-'+u),reg('private-'+u),reg('public-'+u)\n\
         c.modify_image_attribute(ImageId=shared,LaunchPermission={{'Add':[{{'UserId':B}}]}})\n\
         c.modify_image_attribute(ImageId=public,LaunchPermission={{'Add':[{{'Group':'all'}}]}})\n\
         ids=lambda r:sorted(i['ImageId'] for i in r['Images'] if i['ImageId'] in (shared,private,public))\n\
         def err(f):\n\
         \x20   try:\n\
         \x20       f(); return None\n\
         \x20   except Exception as e:\n\
         \x20       return e.response['Error']['Code']\n\
         owner=b.describe_images(ImageIds=[shared])['Images'][0]['OwnerId']\n\
         r={{'names':{{shared:'shared',private:'private',public:'public'}},\n\
            'by_id':ids(b.describe_images(ImageIds=[shared])),'owner':owner,\n\
            'private_by_id':err(lambda: b.describe_images(ImageIds=[private])),\n\
            'none':ids(b.describe_images()),\n\
            'exec_self':ids(b.describe_images(ExecutableUsers=['self'])),\n\
            'exec_all':ids(b.describe_images(ExecutableUsers=['all'])),\n\
            'owners_a':ids(b.describe_images(Owners=[owner])),\n\
            'owners_self':ids(b.describe_images(Owners=['self'])),\n\
            'a_self':ids(c.describe_images(Owners=['self'])),\n\
            'b_modify':err(lambda: b.modify_image_attribute(ImageId=shared,LaunchPermission={{'Add':[{{'UserId':'999988887777'}}]}}))}}\n\
         c.modify_image_attribute(ImageId=shared,LaunchPermission={{'Remove':[{{'UserId':B}}]}})\n\
         r['after_unshare']=err(lambda: b.describe_images(ImageIds=[shared]))\n\
         print(json.dumps(r))"
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let names = |key: &str| -> Vec<String> {
        let mut n: Vec<String> = v[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                v["names"][i.as_str().unwrap()]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        n.sort();
        n
    };
    assert_eq!(names("by_id"), ["shared"]);
    assert_ne!(v["owner"], ACCOUNT_B, "the AMI is still account A's");
    assert_eq!(v["private_by_id"], "InvalidAMIID.NotFound");
    assert_eq!(names("none"), ["public", "shared"]);
    assert_eq!(names("exec_self"), ["shared"]);
    assert_eq!(names("exec_all"), ["public"]);
    assert_eq!(names("owners_a"), ["public", "shared"]);
    assert!(names("owners_self").is_empty());
    assert_eq!(names("a_self"), ["private", "public", "shared"]);
    assert_eq!(v["b_modify"], "InvalidAMIID.NotFound");
    assert_eq!(v["after_unshare"], "InvalidAMIID.NotFound");
}

/// moto_launcher.py's `copy_image_honouring_client_token_and_tags`, against the EC2 API reference's CopyImage:
/// the same ClientToken with the same parameters returns the first copy (no second one), with other parameters
/// fails with IdempotentParameterMismatch; TagSpecifications tag the copy; CopyImageTags copies the source's
/// user tags.
#[test]
fn copy_image_is_idempotent_by_client_token_and_tags_the_copy() {
    let out = ec2_py(
        "import uuid\n\
         u=uuid.uuid4().hex[:8]\n\
         w=boto3.client('ec2',endpoint_url=c.meta.endpoint_url,region_name='eu-central-1',aws_access_key_id='t',aws_secret_access_key='t')\n\
         v=c.create_volume(Size=1,AvailabilityZone='us-east-1a')['VolumeId']\n\
         s=c.create_snapshot(VolumeId=v)['SnapshotId']\n\
         src=c.register_image(Name='src-'+u,RootDeviceName='/dev/xvda',BlockDeviceMappings=[{'DeviceName':'/dev/xvda','Ebs':{'SnapshotId':s}}],\n\
           TagSpecifications=[{'ResourceType':'image','Tags':[{'Key':'team','Value':'x'}]}])['ImageId']\n\
         def cp(tok,name):\n\
         \x20   return w.copy_image(SourceImageId=src,SourceRegion='us-east-1',Name=name,ClientToken=tok,CopyImageTags=True,\n\
         \x20     TagSpecifications=[{'ResourceType':'image','Tags':[{'Key':'k','Value':'v'}]}])['ImageId']\n\
         a=cp('tok-'+u,'copy-'+u)\n\
         b=cp('tok-'+u,'copy-'+u)\n\
         try:\n\
         \x20   cp('tok-'+u,'other-'+u); mismatch=None\n\
         except Exception as e:\n\
         \x20   mismatch=e.response['Error']['Code']\n\
         n=len([i for i in w.describe_images(Owners=['self'])['Images'] if i['Name']=='copy-'+u])\n\
         t=sorted((x['Key'],x['Value']) for x in w.describe_images(ImageIds=[a])['Images'][0].get('Tags',[]))\n\
         c1=cp('tok2-'+u,'copy2-'+u); c2=cp('tok3-'+u,'copy2-'+u)\n\
         print(json.dumps({'same':a==b,'n':n,'mismatch':mismatch,'tags':t,'distinct':c1!=c2}))",
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["same"], true, "the same token made another copy");
    assert_eq!(v["n"], 1);
    assert_eq!(v["mismatch"], "IdempotentParameterMismatch");
    assert_eq!(v["tags"], serde_json::json!([["k", "v"], ["team", "x"]]));
    assert_eq!(v["distinct"], true, "other tokens make other copies");
}
